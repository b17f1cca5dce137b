//! A minimal MQTT 3.1.1 subscriber for the load tool: CONNECT, one
//! SUBSCRIBE, then PUBLISH packets (PUBACK for QoS 1), over WebSocket (the
//! same tokio-tungstenite stack as the bridge subscribers, subprotocol
//! `mqtt`) or plain TCP.
//!
//! Why not rumqttc here: its event loop over WebSocket cost the bench about
//! five times the CPU per received message of a tungstenite client, so with
//! 1,000 subscribers on 2 cores the load tool, not Mosquitto, was the
//! bottleneck. This client does the least an MQTT subscriber must do, so
//! both servers are measured with equally light clients. (rumqttc stays
//! available with `--mqtt-client rumqttc`.)
//!
//! Keep-alive is 0 (none): idle connections send nothing, like the bridge's
//! idle clients (whose server pings them).

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::clients::Subscriber;
use crate::stats::Recorder;

enum Conn {
    Ws(Box<WebSocketStream<TcpStream>>),
    Tcp(TcpStream),
}

/// A connected, subscribed raw MQTT client.
pub struct RawMqttSub {
    conn: Conn,
    /// Bytes of a packet split across reads.
    buf: Vec<u8>,
}

impl RawMqttSub {
    /// Connects to 127.0.0.1:`port` (over WebSocket when `websocket`),
    /// subscribes to `topic` at `qos` (0 or 1) and waits for the SUBACK.
    pub async fn connect(
        websocket: bool,
        port: u16,
        id: &str,
        topic: &str,
        qos: u8,
        read_buffer: usize,
    ) -> Result<RawMqttSub, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("TCP connect to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let conn = if websocket {
            let mut request = format!("ws://{addr}/mqtt")
                .into_client_request()
                .map_err(|e| e.to_string())?;
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                "mqtt".parse().expect("valid header value"),
            );
            let config = WebSocketConfig::default()
                .read_buffer_size(read_buffer)
                .write_buffer_size(0)
                .max_write_buffer_size(64 * 1024);
            let (ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
                .await
                .map_err(|e| format!("WebSocket handshake with {addr}: {e}"))?;
            Conn::Ws(Box::new(ws))
        } else {
            Conn::Tcp(tcp)
        };
        let mut sub = RawMqttSub {
            conn,
            buf: Vec::new(),
        };
        sub.send(connect_packet(id)).await?;
        let connack = sub.next_packet().await?;
        match connack.as_slice() {
            [0x20, 0x02, _, 0x00] => {}
            other => return Err(format!("CONNACK refused or malformed: {other:02x?}")),
        }
        sub.send(subscribe_packet(topic, qos)).await?;
        let suback = sub.next_packet().await?;
        match suback.as_slice() {
            [0x90, 0x03, 0x00, 0x01, rc] if *rc < 0x80 => Ok(sub),
            other => Err(format!("SUBACK refused or malformed: {other:02x?}")),
        }
    }

    async fn send(&mut self, packet: Vec<u8>) -> Result<(), String> {
        match &mut self.conn {
            Conn::Ws(ws) => ws
                .send(Message::Binary(packet.into()))
                .await
                .map_err(|e| format!("send: {e}")),
            Conn::Tcp(tcp) => tcp
                .write_all(&packet)
                .await
                .map_err(|e| format!("send: {e}")),
        }
    }

    /// Appends the next chunk of bytes from the connection to `buf`.
    async fn read_more(&mut self) -> Result<(), String> {
        match &mut self.conn {
            Conn::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => {
                        self.buf.extend_from_slice(&b);
                        return Ok(());
                    }
                    Some(Ok(Message::Close(f))) => return Err(format!("closed: {f:?}")),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("read: {e}")),
                    None => return Err("connection closed".into()),
                }
            },
            Conn::Tcp(tcp) => {
                // Room for 16 KiB, read into it without zero-filling.
                self.buf.reserve(16 * 1024);
                let n = tcp
                    .read_buf(&mut self.buf)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err("connection closed".into());
                }
                Ok(())
            }
        }
    }

    /// One whole packet (for the handshake).
    async fn next_packet(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(len) = packet_len(&self.buf) {
                return Ok(self.buf.drain(..len).collect());
            }
            self.read_more().await?;
        }
    }
}

impl Subscriber for RawMqttSub {
    async fn receive(mut self, rec: Recorder) {
        let mut acks = Vec::new();
        loop {
            if let Err(e) = self.read_more().await {
                rec.ended(e);
                return;
            }
            let mut at = 0;
            while let Some(len) = packet_len(&self.buf[at..]) {
                let packet = &self.buf[at..at + len];
                if let Some((payload, ack)) = publish_payload(packet) {
                    rec.message(payload);
                    if let Some(id) = ack {
                        acks.extend_from_slice(&[0x40, 0x02, (id >> 8) as u8, id as u8]);
                    }
                }
                at += len;
            }
            self.buf.drain(..at);
            if !acks.is_empty() {
                let packet = std::mem::take(&mut acks);
                if let Err(e) = self.send(packet).await {
                    rec.ended(e);
                    return;
                }
            }
        }
    }

    async fn idle(mut self) {
        while self.read_more().await.is_ok() {
            self.buf.clear();
        }
    }
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
}

fn string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn connect_packet(id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    string("MQTT", &mut body);
    body.push(4); // protocol level 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&0u16.to_be_bytes()); // keep-alive: none
    string(id, &mut body);
    let mut out = vec![0x10];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

fn subscribe_packet(topic: &str, qos: u8) -> Vec<u8> {
    let mut body = vec![0x00, 0x01]; // packet id 1
    string(topic, &mut body);
    body.push(qos.min(1));
    let mut out = vec![0x82];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// The length of the whole packet at the start of `buf`, if it is all there.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    let mut shift = 0;
    for (i, &b) in buf.iter().enumerate().skip(1).take(4) {
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            let total = 1 + i + len;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}

/// The payload of a whole PUBLISH packet, and its packet id when QoS 1 needs
/// a PUBACK.
fn publish_payload(packet: &[u8]) -> Option<(&[u8], Option<u16>)> {
    let first = *packet.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 3;
    let mut at = 1;
    while packet.get(at)? & 0x80 != 0 {
        at += 1;
    }
    at += 1;
    let topic_len = usize::from(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]));
    at += 2 + topic_len;
    let ack = if qos > 0 {
        let id = u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]);
        at += 2;
        Some(id)
    } else {
        None
    };
    Some((packet.get(at..)?, ack))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_publish() {
        let mut p = vec![0x30];
        let body_len = 2 + 7 + 300;
        remaining_length(body_len, &mut p);
        assert_eq!(p.len(), 3); // 309 takes two length bytes
        string("bench/t", &mut p);
        p.extend(std::iter::repeat_n(b'x', 300));
        assert_eq!(packet_len(&p), Some(p.len()));
        assert_eq!(packet_len(&p[..p.len() - 1]), None);
        let (payload, ack) = publish_payload(&p).unwrap();
        assert_eq!(payload.len(), 300);
        assert_eq!(ack, None);
        // QoS 1 carries a packet id.
        let q1 = [0x32, 0x06, 0x00, 0x01, b't', 0x12, 0x34, b'x'];
        assert_eq!(publish_payload(&q1), Some((&b"x"[..], Some(0x1234))));
        assert_eq!(packet_len(&[0x90, 0x03, 0, 1, 0]), Some(5));
        assert_eq!(connect_packet("c")[..4], [0x10, 13, 0x00, 0x04]);
    }
}
