"""Text for XML 1.0 documents (SES v1 Query replies, the SNS endpoint's errors)."""

from __future__ import annotations

import re
from xml.sax.saxutils import escape as _escape_markup

# Characters XML 1.0 has no place for, even escaped (C0 controls but tab, LF and CR; surrogates;
# U+FFFE and U+FFFF): a reply echoing one would not parse.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def escape(text: str) -> str:
    """`text` as XML character data: markup escaped, characters XML cannot hold as U+FFFD."""
    return _escape_markup(_NOT_XML.sub("\ufffd", text))
