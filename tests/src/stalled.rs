//! A WebSocket client that stops reading: its socket's receive buffer is
//! tiny, so the kernel cannot hide the backlog from the server, and the test
//! decides when (or whether) it reads again.

use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;

/// Connects to `url` (`ws://IP:PORT/ws`) with a 4 KiB receive buffer.
pub async fn stalled_ws(url: &str) -> WebSocketStream<TcpStream> {
    let addr: std::net::SocketAddr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .expect("a ws://IP:PORT/ws URL");
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    ws
}
