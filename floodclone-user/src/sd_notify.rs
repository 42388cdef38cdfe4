//! systemd's readiness protocol (`Type=notify`): one datagram, `READY=1`, to the socket
//! systemd names in `NOTIFY_SOCKET`, so `systemctl start` returns once the node serves
//! (the source has hashed its file and opened its port; a destination has opened its
//! endpoint). Outside systemd the variable is unset and nothing is sent.

use std::{io, os::unix::net::UnixDatagram, path::Path};

/// Tells systemd this node is ready (a no-op outside a `Type=notify` service).
pub fn ready() {
    if let Some(socket) = std::env::var_os("NOTIFY_SOCKET") {
        if let Err(e) = notify(Path::new(&socket), "READY=1") {
            tracing::warn!("could not tell systemd the service is ready: {e}");
        }
    }
}

/// Sends `state` to the notification socket at `socket` (a leading `@` names an abstract
/// socket, as systemd may pass).
pub fn notify(socket: &Path, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let name = socket.as_os_str().as_encoded_bytes();
    if let Some(abstract_name) = name.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), socket)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("fc-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify(&path, "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("fc-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify(Path::new(&format!("@{name}")), "READY=1").unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
