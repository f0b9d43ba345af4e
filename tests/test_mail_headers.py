"""Mail.headers as SES's mail object has them: the top-level headers in order, values unfolded,
flagged as truncated past 10 KB."""

from __future__ import annotations

from postmesh.common.mailheaders import MAX_HEADER_BYTES, top_headers

MESSAGE = (
    b"From: Sender <news@example.test>\r\nTo: a@example.test,\r\n b@example.test\r\nSubject: Hello\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="x"\r\n\r\n'
    b"--x\r\nContent-Type: text/plain\r\nX-Inner: not top-level\r\n\r\nHi\r\n--x--\r\n"
)


def test_top_level_headers_in_order_and_unfolded() -> None:
    headers, truncated = top_headers(MESSAGE)
    assert [(h.name, h.value) for h in headers] == [
        ("From", "Sender <news@example.test>"),
        ("To", "a@example.test, b@example.test"),
        ("Subject", "Hello"),
        ("MIME-Version", "1.0"),
        ("Content-Type", 'multipart/alternative; boundary="x"'),
    ]
    assert not truncated


def test_headers_past_ses_limit_are_cut_and_flagged() -> None:
    many = b"".join(b"X-Tag-%d: %s\r\n" % (n, b"v" * 200) for n in range(100))
    headers, truncated = top_headers(b"Subject: big\r\n" + many + b"\r\nbody\r\n")
    assert truncated and headers[0].name == "Subject"
    assert sum(len(h.name) + len(h.value) + 4 for h in headers) <= MAX_HEADER_BYTES
