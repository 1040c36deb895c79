#![forbid(unsafe_code)]

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};
use yidi_common::telemetry::{self, Identity};

/// Binds with TCP_NODELAY, which Linux passes on to every accepted connection. A CheckCards answer
/// spans many TCP segments; with Nagle's algorithm on, its last segment waits for the client's
/// delayed ACK (40 ms a call). The shared server cannot set it: tonic ignores its own
/// `tcp_nodelay` when serving an incoming stream.
fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: yidi_registry::config::RegistryConfig = yidi_common::config::load("registry")?;
    config.validate()?;
    let telemetry =
        telemetry::init(&config.log, Identity { service: "yidi-registry", bureau_id: &config.server.bureau_id })?;
    let served = async {
        let listener = bind(config.server.listen)?;
        println!("yidi-registry listening on {}", listener.local_addr()?); // the launcher reads this line
        yidi_registry::serve(config, listener, yidi_common::shutdown::signal()).await
    }
    .await;
    telemetry.shutdown().await;
    served
}
