//! `--metrics ADDR`: the node's figures for Prometheus, as its text format over plain HTTP
//! (`GET /metrics`). The page is rendered once per measurement tick (every 0.5 s on the
//! source, 0.2 s on a destination) from what the node measures anyway; a scrape only
//! copies it, so scraping costs the transfer nothing. Bind it to a management address: the
//! figures (peer addresses, progress) are not secret, but not everyone's either.

use std::{
    fmt::Write,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::meter::{Meters, RttSource};

/// What the role counts, for the page.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub file_bytes: u64,
    pub held_bytes: u64,
    /// Chunks received and verified here.
    pub chunks_verified: u64,
    /// Chunks received that failed verification.
    pub chunks_failed: u64,
    /// Chunks received that were not needed (raced copies).
    pub chunks_duplicate: u64,
}

/// A peer's round trip, and where it came from.
#[derive(Clone, Copy, Debug)]
pub struct PeerRtt {
    pub peer: IpAddr,
    pub rtt_s: f64,
    pub source: RttSource,
}

/// The page served, replaced at each tick.
#[derive(Clone, Default)]
pub struct Exporter {
    page: Arc<Mutex<String>>,
}

/// Longest request read; a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 << 10;
/// A client that does not finish its request within this is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl Exporter {
    /// Listens on `addr` (in the running tokio runtime) and serves the page from now on.
    pub fn serve(addr: SocketAddr) -> std::io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let exporter = Self::default();
        let page = exporter.page.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let page = page.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, page)).await;
                });
            }
        });
        Ok(exporter)
    }

    pub fn publish(&self, page: String) {
        *self.page.lock().unwrap() = page;
    }
}

/// Reads one request and answers it: the page for `GET /metrics`, 404 otherwise.
async fn answer(
    mut stream: tokio::net::TcpStream,
    page: Arc<Mutex<String>>,
) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let mut words = line.split_whitespace();
    let (status, body) = match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", page.lock().unwrap().clone()),
        _ => ("404 Not Found", "try GET /metrics\n".to_string()),
    };
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// A label value in the text format: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The page: every metric with its HELP and TYPE lines (README, "Metrics").
pub fn render(
    role: &str,
    counts: &Counts,
    meters: &Meters,
    peers: usize,
    rtts: &[PeerRtt],
) -> String {
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, f64)]| {
        let _ = writeln!(s, "# HELP floodclone_{name} {help}");
        let _ = writeln!(s, "# TYPE floodclone_{name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(s, "floodclone_{name}{labels} {v}");
        }
    };
    metric(
        "info",
        "gauge",
        "This process, by role (source or destination).",
        &[(format!("{{role=\"{}\"}}", label(role)), 1.0)],
    );
    let mut links: Vec<_> = meters.links.values().filter(|m| m.peer.is_some()).collect();
    links.sort_by_key(|m| (m.ifindex, m.peer));
    let by_link = |f: &dyn Fn(&crate::meter::LinkMeter) -> f64| -> Vec<(String, f64)> {
        links
            .iter()
            .map(|m| {
                let iface = crate::linkstats::interface_name(m.ifindex);
                let peer = m.peer.map(|p| p.to_string()).unwrap_or_default();
                (
                    format!("{{iface=\"{}\",peer=\"{}\"}}", label(&iface), label(&peer)),
                    f(m),
                )
            })
            .collect()
    };
    // The in-kernel counters, one row per link: all counters.
    type LinkFigure = fn(&crate::meter::LinkMeter) -> f64;
    let link_counters: [(&str, &str, LinkFigure); 4] = [
        (
            "link_sent_bytes_total",
            "Bytes sent to the peer on the interface, IP headers included (in-kernel counters).",
            |m| m.tx.bytes as f64,
        ),
        (
            "link_received_bytes_total",
            "Bytes received from the peer on the interface, IP headers included (in-kernel counters).",
            |m| m.rx.bytes as f64,
        ),
        (
            "link_sent_packets_total",
            "Packets sent to the peer on the interface (in-kernel counters).",
            |m| m.tx.packets as f64,
        ),
        (
            "link_received_packets_total",
            "Packets received from the peer on the interface (in-kernel counters).",
            |m| m.rx.packets as f64,
        ),
    ];
    for (name, help, figure) in link_counters {
        metric(name, "counter", help, &by_link(&figure));
    }
    let rtt_rows: Vec<(String, f64)> = rtts
        .iter()
        .map(|r| {
            (
                format!(
                    "{{peer=\"{}\",source=\"{}\"}}",
                    r.peer,
                    r.source.short_name()
                ),
                r.rtt_s,
            )
        })
        .collect();
    metric(
        "peer_rtt_seconds",
        "gauge",
        "Round trip to the peer: from the QUIC spin bit seen in the kernel (source=spin), else quinn's estimate (source=quic).",
        &rtt_rows,
    );
    // The node-wide figures: one unlabelled value each.
    let scalars: [(&str, &str, &str, f64); 6] = [
        ("peers", "gauge", "Open connections to peers.", peers as f64),
        (
            "file_bytes",
            "gauge",
            "Size of the file being delivered.",
            counts.file_bytes as f64,
        ),
        (
            "held_bytes",
            "gauge",
            "Bytes of the file this node holds, verified.",
            counts.held_bytes as f64,
        ),
        (
            "chunks_verified_total",
            "counter",
            "Chunks received here and verified.",
            counts.chunks_verified as f64,
        ),
        (
            "chunks_failed_total",
            "counter",
            "Chunks received here that failed verification (fetched again).",
            counts.chunks_failed as f64,
        ),
        (
            "chunks_duplicate_total",
            "counter",
            "Chunks received here that were already held (a race's loser).",
            counts.chunks_duplicate as f64,
        ),
    ];
    for (name, kind, help, value) in scalars {
        metric(name, kind, help, &[(String::new(), value)]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_help_type_and_escaped_labels() {
        let counts = Counts {
            file_bytes: 100,
            held_bytes: 50,
            ..Counts::default()
        };
        let rtts = [PeerRtt {
            peer: IpAddr::from([10, 0, 0, 2]),
            rtt_s: 0.04,
            source: RttSource::Spin,
        }];
        let page = render("destination", &counts, &Meters::default(), 2, &rtts);
        for name in [
            "info",
            "link_sent_bytes_total",
            "link_received_bytes_total",
            "peer_rtt_seconds",
            "peers",
            "file_bytes",
            "held_bytes",
            "chunks_verified_total",
            "chunks_failed_total",
            "chunks_duplicate_total",
        ] {
            assert!(
                page.contains(&format!("# TYPE floodclone_{name} ")),
                "{name}: {page}"
            );
        }
        assert!(page.contains("floodclone_held_bytes 50\n"), "{page}");
        assert!(
            page.contains("floodclone_peer_rtt_seconds{peer=\"10.0.0.2\",source=\"spin\"} 0.04\n")
        );
        assert!(page.contains("floodclone_info{role=\"destination\"} 1\n"));
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
