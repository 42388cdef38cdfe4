//! Where members are, as an operator writes it: `ADDR`, `ADDR:PORT`, `HOST` or `HOST:PORT`
//! (a name is resolved once, at start, to its first IPv4 address), one per `--dest`, or
//! one per line of a `--dests-file` (`#` starts a comment). IPv6 is refused with a clear
//! message: the kernel's counters and the member list are IPv4 today.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, ToSocketAddrs},
    path::Path,
};

/// A member's address and its port, if given (otherwise `--port`).
pub type HostPort = (Ipv4Addr, Option<u16>);

/// Parses `ADDR[:PORT]` or `HOST[:PORT]`, resolving a name to its first IPv4 address.
pub fn parse_host(s: &str) -> Result<HostPort, String> {
    let s = s.trim();
    if s.parse::<std::net::Ipv6Addr>().is_ok() || s.starts_with('[') {
        return Err(format!(
            "{s:?}: IPv6 is not supported yet; give an IPv4 address or a name with one"
        ));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((host, port)) => {
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
            (host, Some(port))
        }
        None => (s, None),
    };
    if host.is_empty() {
        return Err(format!("{s:?}: no address or host name"));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok((ip, port));
    }
    let resolved = (host, 0)
        .to_socket_addrs()
        .map_err(|e| format!("{s:?}: cannot resolve {host:?}: {e}"))?;
    let ip = resolved
        .filter_map(|a| match a.ip() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        })
        .next()
        .ok_or_else(|| {
            format!("{s:?}: {host:?} has no IPv4 address (IPv6 is not supported yet)")
        })?;
    Ok((ip, port))
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
        let ip = Ipv4Addr::new(10, 0, 0, 7);
        assert_eq!(parse_host("10.0.0.7"), Ok((ip, None)));
        assert_eq!(parse_host(" 10.0.0.7:9000 "), Ok((ip, Some(9000))));
        // Names resolve without a network through /etc/hosts.
        assert_eq!(parse_host("localhost:7878").unwrap().1, Some(7878));
        assert!(parse_host("localhost").unwrap().0.is_loopback());
        for (bad, says) in [
            ("::1", "IPv6"),
            ("[fe80::1]:7878", "IPv6"),
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
                (Ipv4Addr::new(10, 0, 0, 1), None),
                (Ipv4Addr::new(10, 0, 0, 2), Some(9000))
            ])
        );
        let err = parse_dests_file("10.0.0.1\n10.0.0.x:1\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        let twice = [
            (Ipv4Addr::new(10, 0, 0, 1), None),
            (Ipv4Addr::new(10, 0, 0, 1), Some(1)),
        ];
        assert!(check_unique(&twice).unwrap_err().contains("listed twice"));
    }
}
