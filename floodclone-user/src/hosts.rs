//! Where members are, as an operator writes it: `ADDR`, `ADDR:PORT`, `[IPV6]:PORT`, `HOST`
//! or `HOST:PORT` (an IPv6 address with no port may be written bare), one per `--dest`, or
//! one per line of a `--dests-file` (`#` starts a comment). A name is resolved once, at
//! start, to its first address in the system's order (RFC 6724 through getaddrinfo, so
//! `/etc/gai.conf` decides between the families).

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr, ToSocketAddrs},
    path::Path,
};

/// A member's address and its port, if given (otherwise `--port`).
pub type HostPort = (IpAddr, Option<u16>);

fn port_of(s: &str, port: &str) -> Result<u16, String> {
    port.parse::<u16>()
        .map_err(|_| format!("{s:?}: {port:?} is not a port number"))
}

/// Refuses addresses that name no one host across a network.
fn usable(s: &str, ip: IpAddr) -> Result<IpAddr, String> {
    let ip = ip.to_canonical();
    if let IpAddr::V6(v6) = ip {
        if v6.is_unicast_link_local() {
            return Err(format!(
                "{s:?}: a link-local address holds only on one link and needs an interface; \
                 give a global or unique-local (fd00::/8) address or a name"
            ));
        }
    }
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{s:?}: {ip} is not one host's address"));
    }
    Ok(ip)
}

/// Parses `ADDR[:PORT]`, `[IPV6]:PORT`, a bare IPv6 address, or `HOST[:PORT]`, resolving
/// a name to its first address.
pub fn parse_host(s: &str) -> Result<HostPort, String> {
    let s = s.trim();
    if let Ok(v6) = s.parse::<Ipv6Addr>() {
        return Ok((usable(s, IpAddr::V6(v6))?, None));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: no closing ] after the IPv6 address"))?;
        let v6 = inside
            .parse::<Ipv6Addr>()
            .map_err(|_| format!("{s:?}: {inside:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(port_of(
                s,
                p.strip_prefix(':')
                    .ok_or_else(|| format!("{s:?}: expected :PORT after ]"))?,
            )?),
        };
        return Ok((usable(s, IpAddr::V6(v6))?, port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((host, port)) => (host, Some(port_of(s, port)?)),
        None => (s, None),
    };
    if host.is_empty() {
        return Err(format!("{s:?}: no address or host name"));
    }
    if host.contains(':') {
        return Err(format!(
            "{s:?}: an IPv6 address with a port is written [ADDR]:PORT"
        ));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((usable(s, ip)?, port));
    }
    let first = (host, 0)
        .to_socket_addrs()
        .map_err(|e| format!("{s:?}: cannot resolve {host:?}: {e}"))?
        .map(|a| a.ip())
        .find(|ip| usable(s, *ip).is_ok())
        .ok_or_else(|| format!("{s:?}: {host:?} has no usable address"))?;
    Ok((first.to_canonical(), port))
}

/// The destinations listed in `text` (a `--dests-file`), each line as [`parse_host`]
/// takes it; blank lines and `#` comments are skipped. Errors name the line.
pub fn parse_dests_file(text: &str) -> Result<Vec<HostPort>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        out.push(parse_host(entry).map_err(|e| format!("line {}: {e}", i + 1))?);
    }
    Ok(out)
}

/// Reads a `--dests-file`.
pub fn read_dests_file(path: &Path) -> Result<Vec<HostPort>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the destinations file {}: {e}", path.display()))?;
    parse_dests_file(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Refuses a destination listed twice (after names are resolved): it would be a member
/// that never joins, and `send` would wait for it.
pub fn check_unique(dests: &[HostPort]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for &(ip, _) in dests {
        if !seen.insert(ip) {
            return Err(format!(
                "destination {ip} is listed twice (by --dest, --dests-file or a name that resolves to it)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_names_ports_and_what_is_refused() {
        let ip = IpAddr::from([10, 0, 0, 7]);
        assert_eq!(parse_host("10.0.0.7"), Ok((ip, None)));
        assert_eq!(parse_host(" 10.0.0.7:9000 "), Ok((ip, Some(9000))));
        let v6: IpAddr = "fd00:100::7".parse().unwrap();
        assert_eq!(parse_host("fd00:100::7"), Ok((v6, None)));
        assert_eq!(parse_host("[fd00:100::7]:9000"), Ok((v6, Some(9000))));
        assert_eq!(parse_host("[fd00:100::7]"), Ok((v6, None)));
        // An IPv4-mapped address is the IPv4 one: one spelling per host.
        assert_eq!(parse_host("[::ffff:10.0.0.7]:9000"), Ok((ip, Some(9000))));
        // Names resolve without a network through /etc/hosts.
        assert_eq!(parse_host("localhost:7878").unwrap().1, Some(7878));
        assert!(parse_host("localhost").unwrap().0.is_loopback());
        for (bad, says) in [
            ("fe80::1", "link-local"),
            ("[fe80::1]:7878", "link-local"),
            ("fd00::zz:7878", "[ADDR]:PORT"),
            ("[fd00::1]7878", "expected :PORT"),
            ("[fd00::1:7878", "no closing ]"),
            ("[10.0.0.7]:1", "not an IPv6 address"),
            ("0.0.0.0", "not one host"),
            ("ff02::1", "not one host"),
            ("10.0.0.7:http", "not a port"),
            (":7878", "no address"),
            ("no-such-host.invalid", "cannot resolve"),
        ] {
            let err = parse_host(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_dests_file_skips_comments_and_names_the_bad_line() {
        let text = "# fleet A\n10.0.0.1\n\n10.0.0.2:9000  # the odd port\n   \n";
        assert_eq!(
            parse_dests_file(text),
            Ok(vec![
                (IpAddr::from([10, 0, 0, 1]), None),
                (IpAddr::from([10, 0, 0, 2]), Some(9000))
            ])
        );
        let err = parse_dests_file("10.0.0.1\n10.0.0.x:1\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        let twice = [
            (IpAddr::from([10, 0, 0, 1]), None),
            (IpAddr::from([10, 0, 0, 1]), Some(1)),
        ];
        assert!(check_unique(&twice).unwrap_err().contains("listed twice"));
    }
}
