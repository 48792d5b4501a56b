"""Normalisation: one spelling for each host, address, URL and path, or a refusal.

Every rule and every request goes through these functions before a rule sees it, so each table
row is a pair of spellings that must agree, or an input that must be refused because two parsers
could read it differently. Rows that are attacks say so in their test's name.
"""

from __future__ import annotations

import pytest

from egresslock.errors import InputError
from egresslock.policy import URL, normalize_host, normalize_path, parse_ip_literal, parse_url

# --- hosts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param("example.com", "example.com", id="a plain name is kept"),
    pytest.param("EXAMPLE.Com", "example.com", id="case is folded"),
    pytest.param("example.com.", "example.com", id="a trailing dot is dropped"),
    pytest.param("Example.COM.", "example.com", id="case and trailing dot together"),
    pytest.param("тест.example.com", "xn--e1aybc.example.com", id="a U-label becomes its A-label"),
    pytest.param("xn--e1aybc.example.com", "xn--e1aybc.example.com", id="an A-label is kept"),
    pytest.param("XN--E1AYBC.example.com", "xn--e1aybc.example.com",
                 id="an upper-case A-label is folded"),
    pytest.param("ТЕСТ.example.com", "xn--e1aybc.example.com",
                 id="an upper-case U-label maps to the same A-label"),
    pytest.param("faß.de", "xn--fa-hia.de", id="sharp s is kept (UTS-46 non-transitional)"),
    pytest.param("ＥＸＡＭＰＬＥ.com", "example.com", id="full-width letters map to ASCII"),
    pytest.param("\u212aey.example", "key.example", id="the Kelvin sign maps to k"),
    pytest.param("a\u00adb.example", "ab.example", id="a soft hyphen is ignored (UTS-46)"),
    pytest.param("a_b.example.com", "a_b.example.com", id="an underscore label is accepted"),
    pytest.param("a" * 63 + ".com", "a" * 63 + ".com", id="a 63-byte label is the longest"),
    pytest.param(".".join(["a" * 61] * 4), ".".join(["a" * 61] * 4),
                 id="a 247-byte host is within the 253-byte limit"),
])
def test_normalize_host_gives_one_spelling(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param("a．b。com", "a.b.com", id="full-width and ideographic full stops"),
    pytest.param("a｡b.com", "a.b.com", id="half-width ideographic full stop"),
    pytest.param("evil。com", "evil.com", id="an ideographic dot cannot hide a label boundary"),
    pytest.param("api.github.com。", "api.github.com", id="a look-alike trailing dot"),
])
def test_idn_full_width_dots_attack_is_normalised(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(("raw", "needle"), [
    pytest.param("", "empty host", id="empty"),
    pytest.param(".", "empty once its trailing dot is removed", id="only a dot"),
    pytest.param("a b.com", "' '", id="space"),
    pytest.param("a\tb.com", "'\\t'", id="tab"),
    pytest.param("a/b.com", "'/'", id="slash"),
    pytest.param("a\\b.com", "'\\\\'", id="backslash"),
    pytest.param("user@example.com", "'@'", id="at sign (userinfo cut wrongly)"),
    pytest.param("example.com?x", "'?'", id="question mark"),
    pytest.param("example.com#x", "'#'", id="hash"),
    pytest.param("a\x00b.com", "'\\x00'", id="NUL"),
    pytest.param("a\x7fb.com", "'\\x7f'", id="DEL"),
    pytest.param("a%62.com", "'%'", id="percent (hosts are never percent-decoded)"),
    pytest.param("a!b.com", "'!'", id="punctuation"),
    pytest.param("a\u00a0b.com", "' '", id="no-break space maps to space and is refused"),
    pytest.param("xn--zz.com", "invalid Punycode label 'xn--zz' (Invalid A-label): a label "
                 "beginning 'xn--' must be the A-label of a name IDNA 2008 accepts",
                 id="bad punycode, saying what a valid A-label is"),
    pytest.param("xn--.com", "invalid Punycode label", id="empty punycode"),
    pytest.param("a" * 64 + ".com", "labels are 1-63 characters", id="a 64-byte label"),
    pytest.param(".".join(["a" * 63] * 4) + ".com", "DNS allows 253", id="a 259-byte host"),
    pytest.param("a..b.com", "empty label", id="an empty label in the middle"),
    pytest.param(".example.com", "empty label", id="a leading dot"),
    pytest.param("example.com..", "empty label", id="two trailing dots"),
    pytest.param("-a.com", "do not begin or end with '-'", id="a leading hyphen"),
    pytest.param("a-.com", "do not begin or end with '-'", id="a trailing hyphen"),
    pytest.param("\U0001f4a9.com", "cannot be written in Punycode (Codepoint U+1F4A9 at "
                 "position 1 of '\U0001f4a9' not allowed): labels are a-z, 0-9, '-' and '_', or "
                 "letters and digits IDNA 2008 accepts", id="an emoji label, saying what is valid"),
    pytest.param("a\u2024b.com", "cannot be mapped by UTS-46", id="one dot leader is not a dot"),
    pytest.param("example.123", "looks like an IPv4 address",
                 id="a numeric last label is never a name"),
    pytest.param("example.com:443", "not a valid IPv6 address", id="a port is not part of a host"),
])
def test_normalize_host_refuses_what_no_hostname_holds(raw: str, needle: str) -> None:
    with pytest.raises(InputError) as info:
        normalize_host(raw)
    assert needle in str(info.value)


def test_idn_equality_holds_in_both_directions() -> None:
    assert normalize_host("bücher.example") == normalize_host("xn--bcher-kva.example")
    assert normalize_host("BÜCHER.example.") == normalize_host("xn--bcher-kva.example")


# --- IP literals -------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param("127.0.0.1", "127.0.0.1", id="dotted decimal"),
    pytest.param("2130706433", "127.0.0.1", id="one decimal number"),
    pytest.param("0x7f000001", "127.0.0.1", id="one hex number"),
    pytest.param("0X7F000001", "127.0.0.1", id="one hex number, upper case"),
    pytest.param("0177.0.0.1", "127.0.0.1", id="a leading-zero octal part"),
    pytest.param("0x7f.0.0.1", "127.0.0.1", id="a hex part"),
    pytest.param("127.1", "127.0.0.1", id="two parts: the last fills 24 bits"),
    pytest.param("127.0.1", "127.0.0.1", id="three parts: the last fills 16 bits"),
    pytest.param("127.0.0.1.", "127.0.0.1", id="a trailing dot"),
    pytest.param("0", "0.0.0.0", id="zero"),
    pytest.param("0x", "0.0.0.0", id="a bare 0x is zero, as in WHATWG"),
    pytest.param("１２７.０.０.１", "127.0.0.1", id="full-width digits map into IPv4 shape"),
    pytest.param("127。0。0。1", "127.0.0.1", id="ideographic dots"),
    pytest.param("0" * 50 + "1.0.0.1", "1.0.0.1", id="many leading zeros are octal zero"),
    pytest.param("169.254.43518", "169.254.169.254", id="metadata service in short form"),
    pytest.param("[::1]", "::1", id="bracketed IPv6"),
    pytest.param("::1", "::1", id="bare IPv6"),
    pytest.param("[0:0:0:0:0:0:0:1]", "::1", id="IPv6 in full is compressed (RFC 5952)"),
    pytest.param("[2001:DB8::1]", "2001:db8::1", id="IPv6 hex is lower-cased"),
    pytest.param("[::ffff:7f00:1]", "::ffff:7f00:1", id="IPv4-mapped IPv6 in hex"),
    pytest.param("[::ffff:127.0.0.1]", "::ffff:7f00:1", id="IPv4-mapped IPv6 in dotted form"),
    pytest.param("64:ff9b::7f00:1", "64:ff9b::7f00:1", id="NAT64"),
    pytest.param("[64:ff9b::127.0.0.1]", "64:ff9b::7f00:1", id="NAT64 in dotted form"),
    pytest.param("[2002:7f00:1::1]", "2002:7f00:1::1", id="6to4 carrying 127.0.0.1"),
    pytest.param("[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                 id="Teredo"),
])
def test_ip_literal_spellings_attack_all_reach_one_address(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(("raw", "needle"), [
    pytest.param("1.2.3.256", "out of range", id="a dotted part over 255"),
    pytest.param("256.1.1.1", "out of range", id="a leading part over 255"),
    pytest.param("4294967296", "out of range", id="one number over 2**32-1"),
    pytest.param("1.16777216", "out of range", id="a last part over 24 bits"),
    pytest.param("08.1.1.1", "not a valid octal number", id="8 is not an octal digit"),
    pytest.param("1.2.3.4.5", "looks like an IPv4 address", id="five parts"),
    pytest.param("1" * 5000, "out of range", id="thousands of digits (CPython int limit)"),
    pytest.param("[fe80::1%eth0]", "zone identifiers", id="zone id"),
    pytest.param("fe80::1%25eth0", "zone identifiers", id="percent-encoded zone id"),
    pytest.param("[::1", "not a valid IPv6 address", id="unclosed bracket"),
    pytest.param("[]", "not a valid IPv6 address", id="empty brackets"),
    pytest.param("[1.2.3.4]", "not a valid IPv6 address", id="IPv4 in brackets"),
    pytest.param("[example.com]", "not a valid IPv6 address", id="a name in brackets"),
    pytest.param("::1]", "not a valid IPv6 address", id="a stray closing bracket"),
])
def test_ip_literal_spellings_attack_refuses_the_invalid(raw: str, needle: str) -> None:
    with pytest.raises(InputError) as info:
        normalize_host(raw)
    assert needle in str(info.value)


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param("example.com", None, id="a name is not a literal"),
    pytest.param("0x7f000001", "127.0.0.1", id="a hex literal"),
    pytest.param("[::ffff:127.0.0.1]", "::ffff:7f00:1", id="a bracketed literal"),
    pytest.param("a.0x1.com", None, id="a hex-looking label inside a name"),
])
def test_parse_ip_literal_tells_names_from_addresses(raw: str, expected: str | None) -> None:
    address = parse_ip_literal(raw)
    assert (None if address is None else str(address)) == expected


# --- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param("/", "/", id="root"),
    pytest.param("/a/b", "/a/b", id="plain segments"),
    pytest.param("/a/", "/a/", id="a trailing slash is kept"),
    pytest.param("/%7eu", "/~u", id="%7e decodes to tilde"),
    pytest.param("/%7Eu", "/~u", id="%7E decodes to tilde"),
    pytest.param("/%41%2d%5F", "/A-_", id="every unreserved escape is decoded"),
    pytest.param("/%c3%a9", "/%C3%A9", id="lower-case hex is upper-cased"),
    pytest.param("/a%2fb", "/a%2Fb", id="%2F stays encoded inside its segment"),
    pytest.param("/a%2Fb/c", "/a%2Fb/c", id="%2F is never a separator"),
    pytest.param("/a%3b", "/a%3B", id="a reserved escape stays encoded"),
    pytest.param("/a%25", "/a%25", id="an encoded percent stays encoded"),
    pytest.param("/a%252e%252e", "/a%252e%252e", id="double encoding is not decoded twice"),
    pytest.param("/...", "/...", id="three dots are a name, not a dot segment"),
    pytest.param("/.well-known/x", "/.well-known/x", id="a leading dot in a name"),
    pytest.param("/a;b=c", "/a;b=c", id="path parameters on a name are kept"),
    pytest.param("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,=", id="sub-delims, colon and at are raw"),
])
def test_normalize_path_gives_one_spelling(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(("raw", "needle"), [
    pytest.param("/a/./b", "dot segment", id="dot"),
    pytest.param("/a/../b", "dot segment", id="dot dot"),
    pytest.param("/..", "dot segment", id="dot dot at the end"),
    pytest.param("/a/%2e/b", "dot segment", id="%2e"),
    pytest.param("/a/%2e%2e/b", "dot segment", id="%2e%2e"),
    pytest.param("/a/%2E%2e/b", "dot segment", id="%2E%2e mixed case"),
    pytest.param("/a/.%2e/b", "dot segment", id="dot and %2e"),
    pytest.param("/a/%2e./b", "dot segment", id="%2e and dot"),
    pytest.param("/a/..;/b", "dot segment", id="dot dot with a path parameter (Tomcat)"),
    pytest.param("/a/..;x=1/b", "dot segment", id="dot dot with a named path parameter"),
    pytest.param("/a/..%3B/b", "dot segment", id="dot dot with an encoded semicolon"),
    pytest.param("/a%2F..%2Fb", "dot segment", id="dot dot between encoded slashes"),
    pytest.param("/a/..%2Fb", "dot segment", id="dot dot before an encoded slash"),
    pytest.param("/a/%2e%2e%2fb", "dot segment", id="all of it encoded"),
])
def test_path_traversal_attack_is_refused(raw: str, needle: str) -> None:
    with pytest.raises(InputError) as info:
        normalize_path(raw)
    assert needle in str(info.value)


@pytest.mark.parametrize(("raw", "needle"), [
    pytest.param("/a//b", "empty segment", id="double slash"),
    pytest.param("//", "empty segment", id="only slashes"),
    pytest.param("//evil.test/x", "empty segment", id="network-path look-alike"),
    pytest.param("/a\\b", "backslash", id="raw backslash"),
    pytest.param("/a%5Cb", "backslash (%5C)", id="%5C"),
    pytest.param("/a%5cb", "backslash (%5C)", id="%5c"),
    pytest.param("/a b", "space", id="space"),
    pytest.param("/a\tb", "control or space", id="tab"),
    pytest.param("/a\r\nb", "control or space", id="CR LF"),
    pytest.param("/%00", "control byte %00", id="encoded NUL"),
    pytest.param("/%0d%0a", "control byte %0D", id="encoded CR"),
    pytest.param("/%7F", "control byte %7F", id="encoded DEL"),
    pytest.param("/%zz", "malformed percent-escape", id="non-hex escape"),
    pytest.param("/%2", "malformed percent-escape", id="short escape"),
    pytest.param("/%", "malformed percent-escape", id="bare percent"),
    pytest.param("/é", "raw non-ASCII", id="raw non-ASCII"),
    pytest.param("/a?b", "'?'", id="a query mark (the caller splits the query off)"),
    pytest.param("/a#b", "'#'", id="a fragment mark"),
    pytest.param("a/b", "must begin with '/'", id="relative"),
    pytest.param("", "must begin with '/'", id="empty"),
])
def test_encoded_slashes_and_parser_differentials_attack_are_refused(raw: str,
                                                                      needle: str) -> None:
    with pytest.raises(InputError) as info:
        normalize_path(raw)
    assert needle in str(info.value)


# --- URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param("http://example.com", URL("http", "example.com", 80, "/", None),
                 id="no path means /"),
    pytest.param("https://EXAMPLE.com/a?b=c", URL("https", "example.com", 443, "/a", "b=c"),
                 id="https default port, host folded, query kept"),
    pytest.param("HTTP://example.com/", URL("http", "example.com", 80, "/", None),
                 id="the scheme is case-insensitive"),
    pytest.param("http://example.com:8080", URL("http", "example.com", 8080, "/", None),
                 id="an explicit port"),
    pytest.param("http://example.com:0080/", URL("http", "example.com", 80, "/", None),
                 id="leading zeros in a port"),
    pytest.param("http://example.com?a=b", URL("http", "example.com", 80, "/", "a=b"),
                 id="a query straight after the host"),
    pytest.param("http://example.com/?", URL("http", "example.com", 80, "/", ""),
                 id="an empty query is not no query"),
    pytest.param("http://example.com/?a=b?c/d", URL("http", "example.com", 80, "/", "a=b?c/d"),
                 id="? and / are allowed in a query"),
    pytest.param("http://[::1]:8080/x", URL("http", "::1", 8080, "/x", None),
                 id="an IPv6 authority with a port"),
    pytest.param("http://[::ffff:127.0.0.1]/", URL("http", "::ffff:7f00:1", 80, "/", None),
                 id="an IPv6 authority is normalised"),
    pytest.param("http://2130706433/", URL("http", "127.0.0.1", 80, "/", None),
                 id="an IPv4 literal authority is normalised"),
    pytest.param("http://тест.example.com/%7e", URL("http", "xn--e1aybc.example.com", 80,
                                                    "/~", None),
                 id="IDN host and path both normalised"),
])
def test_parse_url_gives_one_spelling(raw: str, expected: URL) -> None:
    assert parse_url(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param("http://example.com:80/a", "http://example.com/a", id="default http port"),
    pytest.param("https://example.com:443/", "https://example.com/", id="default https port"),
    pytest.param("https://example.com:80/", "https://example.com:80/", id="http port on https"),
    pytest.param("http://[::1]:80/", "http://[::1]/", id="IPv6 keeps its brackets"),
    pytest.param("http://[::1]:81/?q", "http://[::1]:81/?q", id="IPv6 with a port and query"),
])
def test_url_str_is_canonical(raw: str, expected: str) -> None:
    url = parse_url(raw)
    assert str(url) == expected
    assert parse_url(str(url)) == url


def test_url_authority_and_target() -> None:
    url = parse_url("http://[::1]:8080/a?b")
    assert url.authority == "[::1]:8080"
    assert url.target == "/a?b"
    assert parse_url("http://example.com/a").target == "/a"


@pytest.mark.parametrize(("raw", "needle"), [
    pytest.param("http://user:pass@example.com/", "userinfo", id="user and password"),
    pytest.param("http://user@example.com/", "userinfo", id="user only"),
    pytest.param("http://allowed.test@evil.test/", "userinfo", id="allowed host as userinfo"),
    pytest.param("http://allowed.test:80@evil.test/", "userinfo", id="allowed host:port as user"),
    pytest.param("http://example.com%2F@evil.test/", "userinfo", id="encoded slash before @"),
    pytest.param("http://evil.test\\@allowed.test/", "backslash", id="backslash before @"),
    pytest.param("http://allowed.test\\.evil.test/", "backslash", id="backslash in the host"),
    pytest.param("http://example.com\\a", "backslash", id="backslash as a path separator"),
    pytest.param("http://exa mple.com/", "space", id="space in the host"),
    pytest.param("http://example.com/a b", "space", id="space in the path"),
    pytest.param(" http://example.com/", "space", id="leading space"),
    pytest.param("http://example.com/\r\nX-Injected: 1", "'\\r'", id="CR LF injection"),
    pytest.param("http://example.com/\n", "'\\n'", id="bare LF"),
    pytest.param("http://example.com/\x00", "'\\x00'", id="NUL"),
    pytest.param("http://example.com/#frag", "fragment", id="fragment"),
    pytest.param("http://allowed.test#@evil.test/", "fragment", id="fragment before @"),
    pytest.param("http://example.com:/", "must be a number 1-65535", id="empty port"),
    pytest.param("http://example.com:0/", "must be 1-65535", id="port 0"),
    pytest.param("http://example.com:65536/", "must be 1-65535", id="port 65536"),
    pytest.param("http://example.com:x/", "must be a number", id="a name as port"),
    pytest.param("http://example.com:+80/", "must be a number", id="a signed port"),
    pytest.param("http://example.com:٨٠/", "must be a number", id="Arabic-Indic digits"),
    pytest.param("http://example.com:" + "9" * 5000 + "/", "must be 1-65535",
                 id="thousands of port digits (CPython int limit)"),
    pytest.param("http://example.com:80:80/", "more than one ':'", id="two ports"),
    pytest.param("http://::1/", "bracket IPv6", id="unbracketed IPv6"),
    pytest.param("http://[::1/", "unclosed '['", id="unclosed bracket"),
    pytest.param("http://[::1]x/", "after the IPv6 address", id="junk after brackets"),
    pytest.param("http://[::1]:/", "must be a number", id="empty port after IPv6"),
    pytest.param("http://[fe80::1%25eth0]/", "zone identifiers", id="zone id"),
    pytest.param("ftp://example.com/", "only http and https", id="ftp"),
    pytest.param("file:///etc/passwd", "only http and https", id="file"),
    pytest.param("gopher://example.com/", "only http and https", id="gopher"),
    pytest.param("//example.com/", "no scheme", id="scheme-relative"),
    pytest.param("example.com", "no scheme", id="no scheme"),
    pytest.param("http:example.com", "must have '//'", id="missing slashes"),
    pytest.param("http://", "no host", id="no host"),
    pytest.param("http:///a", "no host", id="empty host"),
    pytest.param("http://example.com/a/../b", "dot segment", id="dot segment in the path"),
    pytest.param("http://example.com/?a=%zz", "malformed percent-escape", id="bad query escape"),
    pytest.param("http://example.com/?a=é", "must be percent-encoded", id="raw non-ASCII query"),
    pytest.param("http://example.com%40evil.test/", "'%'", id="encoded at sign in the host"),
])
def test_url_parser_differential_attack_is_refused(raw: str, needle: str) -> None:
    with pytest.raises(InputError) as info:
        parse_url(raw)
    assert needle in str(info.value)


@pytest.mark.parametrize("raw", [
    pytest.param("http://a．b。com/", id="full-width dots"),
    pytest.param("http://A.B.COM./", id="case and trailing dot"),
    pytest.param("http://a.b.com:80/", id="default port"),
])
def test_idn_and_trailing_dot_attack_reach_the_same_url(raw: str) -> None:
    assert parse_url(raw) == parse_url("http://a.b.com/")
