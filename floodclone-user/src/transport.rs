//! QUIC between nodes: one quinn endpoint per node on one UDP port, TLS 1.3 on every
//! connection, and the swarm token proven in both directions and bound to the TLS session.
//!
//! Certificates are self-signed and not what peers trust: after the handshake each side
//! sends a keyed BLAKE3 MAC, keyed by the token, over keying material exported from this
//! very TLS session. A node without the token cannot produce it, and a man in the middle
//! has two different sessions, so a relayed MAC does not verify.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use quinn::{
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
    ClientConfig, Connection, Endpoint, EndpointConfig, Runtime as _, ServerConfig,
    TransportConfig, VarInt,
};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};

use spake2::{Ed25519Group, Identity, Password, Spake2};

use crate::wire::{drain_frames, Msg};

/// The protocol's name and version, checked in the TLS handshake: raised whenever the
/// control messages change (2: `SourceDistance`; 3: addresses of either family; 4: the
/// acceptor's half of the key exchange first, on a stream of its own; 5: `SenderPaths`
/// with the crossing senders; 6: traces answered unknown; 7: `SenderPaths` with the
/// senders avoiding the source), so that nodes of different versions do not connect
/// instead of closing each other's connections on an unknown message.
pub const ALPN: &[u8] = b"floodclone/7";
/// Application close codes.
pub const CLOSE_DONE: u32 = 0;
pub const CLOSE_AUTH: u32 = 1;
pub const CLOSE_PROTOCOL: u32 = 2;
pub const CLOSE_NOT_MEMBER: u32 = 3;
pub const CLOSE_BAD_DATA: u32 = 4;
/// Send priority of the control stream: above every chunk stream, so requests, grants and
/// announcements never wait behind the chunk data queued on the same connection (quinn
/// sends a lower priority stream only when all higher ones are idle).
pub const CONTROL_PRIORITY: i32 = i32::MAX;

const EXPORTER_LABEL: &[u8] = b"EXPORTER-floodclone-token-v1";

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind UDP port {port}: {source} (is another floodclone running? use --port)")]
    Bind { port: u16, source: std::io::Error },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("authentication failed: the peer's swarm token does not match ours (check --token)")]
    BadToken,
    #[error("the peer refused our swarm token (check --token)")]
    Refused,
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("this node's endpoint is shutting down")]
    Stopping,
    #[error(
        "{0}: every node must present the same secret of at least {MIN_TOKEN_CHARS} characters; \
         make one with `floodclone token` and pass it as --token, FLOODCLONE_TOKEN or --token-file"
    )]
    WeakToken(&'static str),
}

/// Shortest token accepted: the token keys the MACs both ends prove, and a peer that
/// records one exchange can guess offline; 16 characters of `floodclone token`'s hex are
/// 64 bits.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Refuses a missing or short token before anything starts.
pub fn check_token(token: &str) -> Result<(), TransportError> {
    match token.chars().count() {
        0 => Err(TransportError::WeakToken("no swarm token given")),
        n if n < MIN_TOKEN_CHARS => Err(TransportError::WeakToken("the swarm token is too short")),
        _ => Ok(()),
    }
}

/// A fresh random token: 256 bits from the kernel, as hex.
pub fn new_token() -> std::io::Result<String> {
    let bytes: [u8; 32] = random_bytes()?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `N` random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    // SAFETY: getrandom fills at most the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(bytes)
}

/// Verifies signatures but accepts any certificate: trust comes from the token MAC.
#[derive(Debug)]
struct TokenTrust(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for TokenTrust {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Share of the congestion window kept after a loss.
///
/// Every link carries our data both ways at once, so the acknowledgements of one direction
/// wait in the queue the other direction keeps full and each connection's RTT includes
/// both queues. A loss-based controller needs a window of rate x that RTT to keep its link
/// busy; CUBIC's cut to 70% (Reno's to 50%) left it below that until the window grew back,
/// for seconds. Reno's additive increase with a cut to 85% keeps it full (measured: README,
/// "Design notes"). Among FloodClone's own connections this
/// still converges like any AIMD; against foreign Reno or CUBIC flows it takes a larger
/// share than they do. A delay-based controller (grow while the RTT stays near its minimum)
/// was tried and starved one direction of a link used both ways: the RTT it sees includes
/// the other direction's queue, which it cannot tell from its own. The default controller
/// ([`crate::congestion`]) cuts by this on every loss that has a queue behind it, and
/// uses the delay only to leave random losses alone (never to cut more).
pub const LOSS_REDUCTION: f32 = 0.85;

/// The congestion controller of every connection of a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Congestion {
    /// Reno's additive increase, a cut to [`LOSS_REDUCTION`] on every loss (see there).
    Reno,
    /// The same, but a loss that came with no queue of its own behind it is taken as
    /// random and leaves the window alone ([`crate::congestion`]).
    #[default]
    Veno,
    /// quinn's BBR (v1): paces at its estimate of the bottleneck rate and the least RTT,
    /// so random loss does not shrink its window.
    Bbr,
}

type CongestionFactory = Arc<dyn quinn::congestion::ControllerFactory + Send + Sync + 'static>;

/// An endpoint's congestion controllers: every connection it dials or accepts is built by
/// this one factory (the default controller's coupling spans them all).
fn congestion(kind: Congestion) -> CongestionFactory {
    match kind {
        Congestion::Reno => {
            let mut c = quinn::congestion::NewRenoConfig::default();
            c.loss_reduction_factor(LOSS_REDUCTION)
                .initial_window(INITIAL_WINDOW);
            Arc::new(c)
        }
        Congestion::Veno => Arc::new(crate::congestion::VenoConfig {
            initial_window: INITIAL_WINDOW,
            coupling: Some(Arc::default()),
        }),
        Congestion::Bbr => {
            let mut c = quinn::congestion::BbrConfig::default();
            c.initial_window(INITIAL_WINDOW);
            Arc::new(c)
        }
    }
}

/// Initial congestion window of every node's connections. The first thing a destination
/// gets is 32 bytes of manifest per chunk (32 KiB for 64 MiB at the default chunk size),
/// in the source's Welcome or from a neighbour it asks (`Msg::AskHashes`), then chunks of
/// 64 KiB and more: from quinn's 14,720 bytes each takes two or three round trips of slow
/// start, and no destination has a chunk before it has the manifest. 64 KiB carries a 128
/// MiB file's manifest, or a chunk, in one round trip, and is still well under the
/// bandwidth-delay product of the paths where round trips matter (quinn paces it over the
/// handshake's RTT). Measured: the source's alone at 20 ms per link (the chain's farthest
/// member waited 0.16 s for the second round trip); every node's on wan-mesh, whose last
/// member had its manifest from a neighbour 80 ms away 0.39 s after its Welcome (nine runs
/// alternating with the source's alone: median 1.196 against 1.222 x U_min).
pub const INITIAL_WINDOW: u64 = 64 << 10;

/// How long after quinn declares a path MTU black hole it searches for a larger MTU again
/// (quinn's default: 60 s). On a congested path a tail-drop queue drops bursts of
/// consecutive full-size packets, which quinn takes for a black hole, and the MTU then stays
/// at 1200 bytes (more headers on the very link that is short of capacity). A search only
/// raises the MTU when its probes get through, so searching again soon costs a real black
/// hole a few lost probes per second and nothing else.
pub const BLACK_HOLE_COOLDOWN: Duration = Duration::from_secs(1);

/// How long a connection may hear nothing from its peer before it is taken for dead. A
/// live peer can be silent for seconds: a connection opened into a path other flows keep
/// full (a tail-drop queue admits theirs and turns away most of its packets; measured on
/// random-27, such connections lost 38-58% of their packets) went 4 s without a packet
/// through, was closed and opened again into the same path, and the member joined anew
/// (a new Welcome over the same path). Starting at the first join (the default), at 4 s
/// the zero-delay mesh took 1.21-1.85 x U_min in half its runs; at 10 s, 1.083-1.093 in
/// eight of eight (README, "Start"). A dead peer's chunks move on sooner than this (the
/// scheduler's stall timer, 2 s); what waits for it is routing around a dead relay.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Transport parameters: windows sized for the bandwidth-delay product of fast links with
/// deep queues (1 Gbit/s x 100 ms = 12.5 MB), liveness checks that notice a dead peer in
/// seconds. The connection's receive window is also memory: quinn keeps received frames
/// as slices of their datagrams' buffers and lets a stream hold up to 2.5 times what it
/// buffers before it copies them out, so a window of 32 MiB, filled while a destination's
/// CPU lagged behind a 10 Gbit/s sender, could hold 80 MiB.
fn transport_config(cc: CongestionFactory, udp_payload: u16) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(4 << 20))
        .receive_window(VarInt::from_u32(16 << 20))
        .send_window(16 << 20)
        .max_concurrent_uni_streams(VarInt::from_u32(1024))
        .keep_alive_interval(Some(Duration::from_millis(500)))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("IDLE_TIMEOUT fits QUIC's idle timeout"),
        ));
    t.congestion_controller_factory(cc);
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.black_hole_cooldown(BLACK_HOLE_COOLDOWN)
        .upper_bound(udp_payload);
    t.mtu_discovery_config(Some(mtud));
    t
}

/// Packets a receiver of chunks may take before it must acknowledge them (the ACK
/// frequency extension; QUIC's default is 1: every second packet). It still acknowledges
/// at once when packets go missing (quinn asks for that beyond a gap of 2), and otherwise
/// 25 ms after the first packet it has not acknowledged at the latest (quinn requests the
/// lesser of the peer's 25 ms and the RTT, but never under 25 ms): a flight of fewer than
/// 16 packets (slow start's first, a slow connection's) waits that long for its ACK.
/// Every 16th, not every 5th (session 37): at 2 Gbit/s a node's CPU goes by the wake-ups,
/// and each ACK is one at both ends (a build and a send, a receive and a wake-up): 8% less
/// CPU per GiB on one 2 Gbit/s link (6.37 -> 5.88 s, six runs each, alternating; the bare
/// transport 10% less), the same at 1 and 10 Gbit/s, and the shipped, 20 ms and wan sets
/// within their spread. A side effect: a TCP flow across a tail-drop queue that six of
/// our small-window connections share kept about twice its share (README, "Other
/// people's traffic", session 37).
const ACK_ELICITING_THRESHOLD: u32 = 15;

/// What an accepted connection lets its dialer send us. A dialer pulls: chunk streams flow
/// only toward it, so all it sends us is its control stream. Small windows and no chunk
/// streams mean a stranger that has not yet proven the token holds next to nothing of
/// ours (the full windows were granted before authentication: 16 MiB per connection).
fn accepting_transport_config(cc: CongestionFactory, udp_payload: u16) -> TransportConfig {
    let mut t = transport_config(cc, udp_payload);
    // The chunk streams flow from here: ask the receiver to acknowledge every 16th packet
    // rather than every 2nd (each ACK is a packet to build, encrypt, send, receive and
    // process at both ends).
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    t.ack_frequency_config(Some(acks));
    t.stream_receive_window(VarInt::from_u32(1 << 20))
        .receive_window(VarInt::from_u32(2 << 20))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_concurrent_bidi_streams(VarInt::from_u32(1));
    t
}

/// The node's endpoint on `port` (both families, [`bind_udp`]), serving and dialing, with the default
/// congestion controller.
pub fn endpoint(port: u16) -> Result<Endpoint, TransportError> {
    endpoint_with(port, Congestion::default())
}

/// ring's TLS 1.3 suites, AES-128-GCM first (rustls offers AES-256-GCM first): with
/// AES-NI a block takes 10 rounds instead of 14 and the GHASH is the same, and every
/// byte of a transfer is sealed once per hop and opened once. AES-256-GCM and
/// ChaCha20-Poly1305 stay offered; both ends run this order, so they agree on the first.
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    })
}

/// The node's endpoint on `port` (both families), its connections run by `cc` from
/// [`INITIAL_WINDOW`] bytes.
pub fn endpoint_with(port: u16, cc: Congestion) -> Result<Endpoint, TransportError> {
    let provider = crypto_provider();
    let tls = |e: rustls::Error| TransportError::Tls(e.to_string());
    let cert = rcgen::generate_simple_self_signed(vec!["floodclone".to_string()])
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let cert_der = CertificateDer::from(cert.cert);
    let key = PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der());
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key.into())
        .map_err(tls)?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let interfaces = interface_limits();
    let udp_payload = udp_payload_for(&interfaces);
    let cc = congestion(cc);
    let transport = Arc::new(transport_config(cc.clone(), udp_payload));
    let mut server = ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server_tls).map_err(|e| TransportError::Tls(e.to_string()))?,
    ));
    server.transport_config(Arc::new(accepting_transport_config(cc, udp_payload)));

    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TokenTrust(provider)))
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).map_err(|e| TransportError::Tls(e.to_string()))?,
    ));
    client.transport_config(transport);

    // Every short header keeps its fixed bit, so the tc programs recognise QUIC packets.
    let mut ep_config = EndpointConfig::default();
    ep_config.grease_quic_bit(false);
    // The tc programs key spin flows on this many bytes of the destination connection ID.
    ep_config.cid_generator(|| {
        Box::new(quinn_proto::RandomConnectionIdGenerator::new(
            floodclone_common::SPIN_DCID_LEN,
        ))
    });
    // Peers may send us packets as large as our interfaces carry.
    ep_config
        .max_udp_payload_size(udp_payload)
        .expect("largest_udp_payload is within QUIC's limits");
    let bind_err = |source| TransportError::Bind { port, source };
    let socket = bind_udp(port).map_err(bind_err)?;
    enlarge_socket_buffers(&socket);
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = BoundedBatches {
        inner: runtime.wrap_udp_socket(socket).map_err(bind_err)?,
        max_segments: segments_per_send(udp_payload, &interfaces),
    };
    let mut ep =
        Endpoint::new_with_abstract_socket(ep_config, Some(server), Arc::new(socket), runtime)
            .map_err(bind_err)?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// The UDP payload of a frame of Ethernet's 1500 bytes (IPv6 and UDP headers off): what
/// every path carries, and quinn's default bound for MTU discovery.
pub const ETHERNET_UDP_PAYLOAD: u16 = 1452;
/// IPv6 and UDP headers: what a frame of `mtu` bytes leaves for a QUIC packet.
const IP_UDP_HEADERS: u32 = 48;
/// Bytes one segmented UDP send may carry in all (the IP length field's limit, headers
/// off).
const MAX_GSO_BYTES: usize = 65_535 - IP_UDP_HEADERS as usize;

/// The largest UDP payload this host's interfaces carry (the loopback aside), at least
/// [`ETHERNET_UDP_PAYLOAD`]: MTU discovery searches up to it, so on 9000-byte (jumbo)
/// links QUIC packets grow to 8952 bytes and a gigabyte takes a sixth of the packets to
/// build, seal, send, receive and open. A path whose hops carry less is found by the
/// search (its probes are lost); the bound only saves probing where no interface could.
pub fn largest_udp_payload() -> u16 {
    udp_payload_for(&interface_limits())
}

fn udp_payload_for(interfaces: &[InterfaceLimits]) -> u16 {
    let mtu = interfaces.iter().map(|i| i.mtu).max().unwrap_or(0);
    let payload = mtu.saturating_sub(IP_UDP_HEADERS).min(65_527) as u16;
    payload.max(ETHERNET_UDP_PAYLOAD)
}

/// Packets the endpoint puts in one segmented UDP send on this host (see
/// [`segments_per_send`]).
pub fn packets_per_send() -> usize {
    let interfaces = interface_limits();
    segments_per_send(udp_payload_for(&interfaces), &interfaces)
}

/// What an interface that is up (the loopback aside) carries.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct InterfaceLimits {
    mtu: u32,
    /// The largest packet a sender may hand it at once, headers included, and the most
    /// segments that packet may have (its segmentation offload's limits); the kernel cuts
    /// a larger one into single packets before the interface.
    gso_max_size: Option<u32>,
    gso_max_segs: Option<u32>,
}

impl InterfaceLimits {
    /// Packets of `payload` bytes one segmented send may hand this interface whole.
    fn whole_batch(&self, payload: usize) -> Option<usize> {
        let by_size = self
            .gso_max_size
            .map(|g| (g as usize).saturating_sub(1 + GSO_HEADERS) / payload);
        let by_segs = self.gso_max_segs.map(|s| s as usize);
        match (by_size, by_segs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The interfaces of this network namespace that are up, the loopback aside; none when
/// the kernel cannot be asked (then every bound falls back to Ethernet's).
fn interface_limits() -> Vec<InterfaceLimits> {
    dump_links().unwrap_or_else(|e| {
        tracing::warn!(
            "cannot list the network interfaces ({e}): QUIC packets stay at Ethernet's size"
        );
        Vec::new()
    })
}

/// One RTM_GETLINK dump over a blocking route netlink socket (the endpoint is made once,
/// before the runtime's netlink connection exists).
fn dump_links() -> std::io::Result<Vec<InterfaceLimits>> {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_route::{
        link::{LinkAttribute, LinkFlags, LinkMessage},
        RouteNetlinkMessage,
    };
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    let invalid = |e: netlink_packet_core::DecodeError| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    };
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut interfaces = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let mut rest = &datagram[..];
        while !rest.is_empty() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest).map_err(invalid)?;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(interfaces),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    let flags = link.header.flags;
                    if flags.contains(LinkFlags::Up) && !flags.contains(LinkFlags::Loopback) {
                        let mut limits = InterfaceLimits::default();
                        for attr in &link.attributes {
                            match *attr {
                                LinkAttribute::Mtu(m) => limits.mtu = m,
                                LinkAttribute::GsoMaxSize(g) => limits.gso_max_size = Some(g),
                                LinkAttribute::GsoMaxSegs(g) => limits.gso_max_segs = Some(g),
                                _ => {}
                            }
                        }
                        interfaces.push(limits);
                    }
                }
                _ => {}
            }
            // Messages in a datagram start 4-byte aligned.
            let len = (msg.header.length as usize).next_multiple_of(4);
            if len == 0 || len > rest.len() {
                break;
            }
            rest = &rest[len..];
        }
    }
}

/// Ethernet, IPv6 and UDP headers: what a segmented send's packet carries besides its
/// segments, counted against an interface's GSO limit.
const GSO_HEADERS: usize = 14 + IP_UDP_HEADERS as usize;

/// Packets of `udp_payload` bytes one segmented send carries: as many as one UDP send may
/// (the IP length field's limit), and no more than the least any of `interfaces` takes
/// whole. A batch over an interface's limit is cut into single packets before it, so
/// each crosses the link and the receiver's stack alone: on the testbed's 16 KB veths,
/// batches of 15 packets cost 7-9% more CPU per byte than batches of 10 that went whole.
/// An interface that takes fewer than two whole (jumbo packets and 16 KB, or one that
/// takes no segmented packets) cuts every batch anyway and does not count; one send of
/// several still saves it the system calls.
fn segments_per_send(udp_payload: u16, interfaces: &[InterfaceLimits]) -> usize {
    let payload = udp_payload.max(1) as usize;
    let by_length = (MAX_GSO_BYTES / payload).max(1);
    interfaces
        .iter()
        .filter_map(|i| i.whole_batch(payload))
        .filter(|&n| n >= 2)
        .fold(by_length, usize::min)
}

/// quinn's socket, sending batches no larger than one segmented UDP send may be and the
/// host's interfaces take whole ([`segments_per_send`]), and counting what it carries for
/// [`crate::park`]. quinn puts up to its cap of packets in a batch whatever their size
/// (10 before the vendored copy lifted it to 64): ten of 8952 bytes exceed the 65,487 bytes one send can carry, the
/// kernel refuses the send (EMSGSIZE), and quinn-udp, which expects that error only of MTU
/// probes, drops the whole batch silently. On a 9000-byte link that read as heavy loss
/// and held the default controller and BBR to ~3 MB/s (session 21); 7 packets a batch
/// there.
#[derive(Debug)]
struct BoundedBatches {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    max_segments: usize,
}

impl quinn::AsyncUdpSocket for BoundedBatches {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        crate::park::count(transmit.contents.len());
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = self.inner.poll_recv(cx, bufs, meta);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            crate::park::count(meta[..n].iter().map(|m| m.len).sum());
        }
        polled
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.max_segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Sets an int socket option.
pub(crate) fn set_int_option(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: a valid socket and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The node's UDP socket on `port`: one dual-stack IPv6 socket (`[::]`, `IPV6_V6ONLY` off,
/// whatever `net.ipv6.bindv6only` says), so one endpoint serves and dials both families
/// and IPv4 peers appear as IPv4-mapped addresses ([`crate::node::remote_ip`] unmaps
/// them). On a host with IPv6 off, `0.0.0.0`.
fn bind_udp(port: u16) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return std::net::UdpSocket::bind(("0.0.0.0", port));
    }
    // SAFETY: fd is a fresh socket; wrapping it closes it on every path below.
    let socket = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    set_int_option(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr.sin6_port = port.to_be();
    // SAFETY: addr is a valid sockaddr_in6 of the stated size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // IPv6 present but with no address to bind (disabled on every interface).
        if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            return std::net::UdpSocket::bind(("0.0.0.0", port));
        }
        return Err(e);
    }
    Ok(socket)
}

/// Socket buffer per direction. All of a node's connections share one UDP socket, and every
/// packet waiting in any link's queue is charged to it: with the default (~200 KB), a few
/// links with full queues block sends on all of them at once.
const SOCKET_BUFFER_BYTES: libc::c_int = 16 << 20;

fn enlarge_socket_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let size = SOCKET_BUFFER_BYTES;
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        let set = |opt| set_int_option(fd, libc::SOL_SOCKET, opt, size).is_ok();
        // The *FORCE variants pass the net.core.{w,r}mem_max cap (needs CAP_NET_ADMIN);
        // otherwise the kernel clamps to the cap.
        if !set(force) && !set(plain) {
            tracing::warn!(
                "could not enlarge the UDP socket buffers; throughput may suffer on many links"
            );
        }
    }
    // What the kernel granted counts buffers' overhead too (it reports twice what was
    // asked for): about half of it is payload.
    let mut granted: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket; an int option read into an int of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut granted as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 && granted > 0 {
        crate::park::set_receive_buffer(granted as u64 / 2);
    }
}

/// The two identities of the key exchange: the side that dials and the side that accepts.
const PAKE_DIALER: &[u8] = b"floodclone dialer";
const PAKE_ACCEPTOR: &[u8] = b"floodclone acceptor";

/// SPAKE2 (Ed25519) on the swarm token: each side sends one group element that reveals
/// nothing about the token, and both derive the same key only if their tokens match. A
/// peer without the token (or a host that took the port of a stopped node) learns one
/// yes/no per connection, never material to guess the token offline.
fn pake_start(token: &str, dialer: bool) -> (Spake2<Ed25519Group>, Vec<u8>) {
    let (password, a, b) = (
        Password::new(token.as_bytes()),
        Identity::new(PAKE_DIALER),
        Identity::new(PAKE_ACCEPTOR),
    );
    if dialer {
        Spake2::<Ed25519Group>::start_a(&password, &a, &b)
    } else {
        Spake2::<Ed25519Group>::start_b(&password, &a, &b)
    }
}

/// The exchange's key bound to this TLS session (so it cannot be replayed on another).
fn session_key(
    pake: Spake2<Ed25519Group>,
    theirs: &[u8],
    conn: &Connection,
) -> Result<[u8; 32], TransportError> {
    let shared = pake
        .finish(theirs)
        .map_err(|e| TransportError::Protocol(format!("malformed key exchange: {e}")))?;
    let mut ekm = [0u8; 32];
    conn.export_keying_material(&mut ekm, EXPORTER_LABEL, b"pake")
        .map_err(|_| TransportError::Tls("keying material export failed".into()))?;
    let mut h = blake3::Hasher::new_derive_key("floodclone swarm token v2");
    h.update(&shared).update(&ekm);
    Ok(*h.finalize().as_bytes())
}

/// One side's proof that it holds the session key.
fn confirmation(key: &[u8; 32], role: &[u8]) -> [u8; 32] {
    *blake3::keyed_hash(key, role).as_bytes()
}

fn mac_matches(a: &[u8; 32], b: &[u8; 32]) -> bool {
    // blake3::Hash compares in constant time.
    blake3::Hash::from_bytes(*a) == blake3::Hash::from_bytes(*b)
}

/// A connection or stream error, as the connection being lost.
fn lost(e: impl std::fmt::Display) -> TransportError {
    TransportError::Lost(e.to_string())
}

/// A control stream: frames out, frames in.
pub struct Control {
    pub send: quinn::SendStream,
    pub recv: ControlRecv,
}

/// The receiving half of a control stream, with its partial-frame buffer.
pub struct ControlRecv {
    recv: quinn::RecvStream,
    buf: Vec<u8>,
}

impl Control {
    /// The control stream opened (or accepted) as `send` and `recv`, at the priority of
    /// control frames.
    fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        let _ = send.set_priority(CONTROL_PRIORITY);
        Self {
            send,
            recv: ControlRecv::new(recv),
        }
    }

    pub async fn send(&mut self, msg: &Msg) -> Result<(), TransportError> {
        self.send.write_all(&msg.encode()).await.map_err(lost)
    }
}

impl ControlRecv {
    fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            buf: Vec::new(),
        }
    }

    /// Reads until at least one message is available; `None` at the end of the stream.
    pub async fn recv_batch(&mut self) -> Result<Option<Vec<Msg>>, TransportError> {
        let mut tmp = [0u8; 16 << 10];
        loop {
            let msgs =
                drain_frames(&mut self.buf).map_err(|e| TransportError::Protocol(e.to_string()))?;
            if !msgs.is_empty() {
                return Ok(Some(msgs));
            }
            match self.recv.read(&mut tmp).await {
                Ok(Some(n)) => self.buf.extend_from_slice(&tmp[..n]),
                Ok(None) => return Ok(None),
                Err(e) => return Err(lost(e)),
            }
        }
    }

    /// One handshake message (small frames only); later frames stay buffered.
    async fn recv_one(&mut self, conn: &Connection) -> Result<Msg, TransportError> {
        let mut tmp = [0u8; 1024];
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if len > 1024 {
                    return Err(TransportError::Protocol("oversized handshake frame".into()));
                }
                if self.buf.len() >= 4 + len {
                    let msg = Msg::decode(&self.buf[4..4 + len])
                        .map_err(|e| TransportError::Protocol(e.to_string()))?;
                    self.buf.drain(..4 + len);
                    return Ok(msg);
                }
            }
            match self.recv.read(&mut tmp).await {
                Ok(Some(n)) => self.buf.extend_from_slice(&tmp[..n]),
                Ok(None) => return Err(TransportError::Lost("stream ended".into())),
                Err(e) => {
                    return Err(match conn.close_reason() {
                        Some(quinn::ConnectionError::ApplicationClosed(c))
                            if c.error_code == VarInt::from_u32(CLOSE_AUTH) =>
                        {
                            TransportError::Refused
                        }
                        _ => lost(e),
                    })
                }
            }
        }
    }
}

/// Dialer side of the handshake, with nothing sent after it ([`authenticate_dialer_with`]).
pub async fn authenticate_dialer(
    conn: &Connection,
    token: &str,
) -> Result<Control, TransportError> {
    authenticate_dialer_with(conn, token, &[]).await
}

/// Dialer side of the handshake. The acceptor sends its half of the key exchange first, on
/// a stream of its own in its first flight (0.5-RTT data), so it arrives with the
/// handshake: ours goes out at once with our confirmation and `hello`, and the acceptor's
/// confirmation comes back with its answer to `hello`, one round trip after the handshake.
/// (The halves one after the other, then the confirmations, took two: on a 300 ms path a
/// member joined 0.3 s later.) `hello` leaves before the acceptor has proven the token:
/// it must hold nothing a host without the token may not see (who we are, what we hold).
pub async fn authenticate_dialer_with(
    conn: &Connection,
    token: &str,
    hello: &[Msg],
) -> Result<Control, TransportError> {
    let (send, recv) = conn.open_bi().await.map_err(lost)?;
    let mut ctl = Control::new(send, recv);
    let half = tokio::time::timeout(AUTH_DEADLINE, async {
        let recv = conn.accept_uni().await.map_err(lost)?;
        ControlRecv::new(recv).recv_one(conn).await
    })
    .await
    .map_err(|_| TransportError::Lost("no key exchange within the deadline".into()))??;
    let Msg::Pake { msg: theirs } = half else {
        return Err(TransportError::Protocol(format!(
            "expected a key exchange, got {half:?}"
        )));
    };
    let (pake, ours) = pake_start(token, true);
    let key = session_key(pake, &theirs, conn)?;
    let mut first = Msg::Pake { msg: ours }.encode();
    first.extend(
        Msg::Auth {
            mac: confirmation(&key, b"dialer"),
        }
        .encode(),
    );
    for m in hello {
        first.extend(m.encode());
    }
    ctl.send.write_all(&first).await.map_err(lost)?;
    match ctl.recv.recv_one(conn).await? {
        Msg::Auth { mac } if mac_matches(&mac, &confirmation(&key, b"acceptor")) => Ok(ctl),
        Msg::Auth { .. } => {
            conn.close(VarInt::from_u32(CLOSE_AUTH), b"wrong token");
            Err(TransportError::BadToken)
        }
        other => Err(TransportError::Protocol(format!(
            "expected Auth, got {other:?}"
        ))),
    }
}

/// How long a dialer has to open its control stream, and again to prove the token, before
/// it is dropped.
pub const AUTH_DEADLINE: Duration = Duration::from_secs(5);

/// Acceptor side: sends its half of the key exchange on a stream of its own at once (in
/// its first flight when `conn` came from [`quinn::Connecting::into_0rtt`]: 0.5-RTT data,
/// which reveals nothing about the token), checks the dialer's half and confirmation, and
/// only then confirms its own. Nothing is served before that.
pub async fn authenticate_acceptor(
    conn: &Connection,
    token: &str,
) -> Result<Control, TransportError> {
    let (pake, ours) = pake_start(token, false);
    let mut half = conn.open_uni().await.map_err(lost)?;
    half.write_all(&Msg::Pake { msg: ours }.encode())
        .await
        .map_err(lost)?;
    let _ = half.finish();
    let (send, recv) = tokio::time::timeout(AUTH_DEADLINE, conn.accept_bi())
        .await
        .map_err(|_| TransportError::Lost("no control stream within 5 s".into()))?
        .map_err(lost)?;
    let mut ctl = Control::new(send, recv);
    let refuse = |conn: &Connection| {
        conn.close(VarInt::from_u32(CLOSE_AUTH), b"wrong token");
        TransportError::BadToken
    };
    let within = |what: &'static str| {
        move |_| TransportError::Lost(format!("no {what} within the deadline"))
    };
    let first = tokio::time::timeout(AUTH_DEADLINE, ctl.recv.recv_one(conn))
        .await
        .map_err(within("key exchange"))??;
    let Msg::Pake { msg: theirs } = first else {
        return Err(refuse(conn));
    };
    let Ok(key) = session_key(pake, &theirs, conn) else {
        return Err(refuse(conn));
    };
    let proof = tokio::time::timeout(AUTH_DEADLINE, ctl.recv.recv_one(conn))
        .await
        .map_err(within("token proof"))??;
    match proof {
        Msg::Auth { mac } if mac_matches(&mac, &confirmation(&key, b"dialer")) => {
            ctl.send(&Msg::Auth {
                mac: confirmation(&key, b"acceptor"),
            })
            .await?;
            Ok(ctl)
        }
        _ => Err(refuse(conn)),
    }
}

/// Dials `addr` once, waiting at most `patience` for the handshake (a peer that is not
/// listening yet never answers: quinn does not see ICMP port-unreachable).
pub async fn dial(
    ep: &Endpoint,
    addr: SocketAddr,
    patience: Duration,
) -> Result<Connection, TransportError> {
    let connecting = ep.connect(addr, "floodclone").map_err(|e| match e {
        quinn::ConnectError::EndpointStopping => TransportError::Stopping,
        e => lost(e),
    })?;
    tokio::time::timeout(patience, connecting)
        .await
        .map_err(|_| TransportError::Lost(format!("no answer from {addr} within {patience:?}")))?
        .map_err(lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An interface up with `mtu` and GSO limits `size` bytes, `segs` segments.
    fn iface(mtu: u32, size: Option<u32>, segs: Option<u32>) -> InterfaceLimits {
        InterfaceLimits {
            mtu,
            gso_max_size: size,
            gso_max_segs: segs,
        }
    }

    #[test]
    fn a_batch_fits_one_udp_send_and_every_interface_that_takes_batches() {
        // No interface known: what one send carries (jumbo packets 7 at a time; at
        // Ethernet's size 45, quinn's own cap of 10 lifted in the vendored copy).
        assert_eq!(segments_per_send(ETHERNET_UDP_PAYLOAD, &[]), 45);
        assert_eq!(segments_per_send(8952, &[]), 7);
        let kinds = [
            iface(1500, Some(65_536), Some(65_535)),
            iface(1500, Some(16_384), Some(65_535)),
            iface(1500, Some(65_536), Some(4)),
            iface(1500, Some(65_536), Some(1)),
            iface(1500, Some(1_500), None),
            iface(1500, None, None),
        ];
        for payload in [1200, 1452, 4000, 8952, 9000, 65_527] {
            for i in &kinds {
                let n = segments_per_send(payload, std::slice::from_ref(i));
                // One packet is no segmented send: any size QUIC allows.
                assert!(
                    n == 1 || n * payload as usize <= MAX_GSO_BYTES,
                    "{payload} {i:?}: {n}"
                );
                // Whole, wherever the interface takes two or more.
                if let Some(w) = i.whole_batch(payload as usize).filter(|&w| w >= 2) {
                    assert!(n <= w, "{payload} {i:?}: {n} > {w}");
                }
            }
        }
        // The kernel's default 64 KB: 45; the testbed's 16 KB veths: 11 (quinn's 10
        // before); a device of 4 segments: 4; the least of several counts.
        assert_eq!(segments_per_send(1452, &kinds[..1]), 45);
        assert_eq!(segments_per_send(1452, &kinds[..2]), 11);
        assert_eq!(segments_per_send(1452, &kinds[2..3]), 4);
        // Jumbo packets past 16 KB, or a device that takes no batches, cut every batch:
        // they do not hold the others' batches down.
        assert_eq!(segments_per_send(8952, &kinds[..2]), 7);
        assert_eq!(segments_per_send(1452, &[kinds[0], kinds[3]]), 45);
    }

    #[test]
    fn the_largest_mtu_counts() {
        assert_eq!(udp_payload_for(&[]), ETHERNET_UDP_PAYLOAD);
        let lan = iface(1500, Some(65_536), None);
        let jumbo = iface(9000, Some(16_384), None);
        assert_eq!(
            udp_payload_for(&[lan, jumbo, iface(1280, None, None)]),
            8952
        );
    }

    /// A dialer with `dialer_token` meets an acceptor with `acceptor_token` over loopback
    /// (the acceptor taking the connection at 0.5-RTT, as the node does); the dialer sends
    /// `hello` with its proof. Returns both sides' results and what the acceptor read first.
    async fn meet(
        dialer_token: &str,
        acceptor_token: &str,
        hello: &[Msg],
    ) -> (
        Result<Control, TransportError>,
        Result<Option<Vec<Msg>>, TransportError>,
    ) {
        let server = endpoint(0).unwrap();
        let client = endpoint(0).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], server.local_addr().unwrap().port()));
        // Each side keeps its connection open until both are done (a dropped one closes).
        let accepting = async {
            let incoming = server.accept().await.unwrap();
            let (conn, _) = incoming.accept().unwrap().into_0rtt().unwrap();
            let read = match authenticate_acceptor(&conn, acceptor_token).await {
                Ok(mut ctl) => ctl.recv.recv_batch().await,
                Err(e) => Err(e),
            };
            (read, conn)
        };
        let dialing = async {
            let conn = dial(&client, addr, Duration::from_secs(5)).await.unwrap();
            (
                authenticate_dialer_with(&conn, dialer_token, hello).await,
                conn,
            )
        };
        let ((dialed, _c), (read, _a)) = tokio::join!(dialing, accepting);
        (dialed, read)
    }

    const TOKEN: &str = "a-token-of-sixteen-or-more";

    #[tokio::test]
    async fn the_dialers_hello_travels_with_its_proof_and_is_read_once_both_are_proven() {
        let (dialed, read) = meet(TOKEN, TOKEN, &[Msg::Hello { id: 7 }]).await;
        assert!(dialed.is_ok(), "{:?}", dialed.err());
        assert_eq!(read.unwrap(), Some(vec![Msg::Hello { id: 7 }]));
    }

    #[tokio::test]
    async fn a_wrong_token_on_either_side_admits_nothing() {
        let (dialed, read) = meet(
            "a-wrong-token-but-long-enough",
            TOKEN,
            &[Msg::Hello { id: 7 }],
        )
        .await;
        assert!(
            matches!(dialed, Err(TransportError::Refused)),
            "{:?}",
            dialed.err()
        );
        assert!(matches!(read, Err(TransportError::BadToken)), "{read:?}");
        let (dialed, read) = meet(TOKEN, "a-wrong-token-but-long-enough", &[]).await;
        assert!(
            matches!(
                dialed,
                Err(TransportError::BadToken | TransportError::Refused)
            ),
            "{:?}",
            dialed.err()
        );
        assert!(read.is_err(), "the acceptor read {read:?}");
    }
}
