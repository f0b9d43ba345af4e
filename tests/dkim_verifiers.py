"""DKIM verifiers independent of postmesh's signing path: Perl's Mail::DKIM (Debian's
libmail-dkim-perl), reading public keys from a DNS server on loopback."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import dns.resolver

from postmesh.testing_mail import LoopbackDns

PERL_VERIFY = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS::Resolver;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0]));
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) { $line =~ s/\r?\n\z/\r\n/; $dkim->PRINT($line); }
$dkim->CLOSE;
print $dkim->result, "\n";
"""


def perl_dkim_available() -> bool:
    return shutil.which("perl") is not None and (
        subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e1"], capture_output=True).returncode == 0
    )


def perl_dkim_result(message: bytes, dns_port: int) -> str:
    """Mail::DKIM's verdict: "pass", "fail", "none"... (Debian 12's version checks RSA only)."""
    result = subprocess.run(
        ["perl", "-e", PERL_VERIFY, str(dns_port)], input=message, capture_output=True, timeout=60
    )
    return result.stdout.decode().strip() or result.stderr.decode()


def dkimpy_dns(zone: LoopbackDns) -> Callable[..., bytes | None]:
    """dkimpy's `dnsfunc`: TXT records answered by the loopback DNS server, None when there are none."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = zone.port

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(text.rstrip("."), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(next(iter(answer)).strings)

    return lookup
