//! The subscribers: many connections in one tokio runtime.
//!
//! * [`BridgeSub`]: a WebSocket client of the bridge's JSON protocol
//!   (tokio-tungstenite): `subscribe` with an id, wait for the `ack`, then
//!   read frames.
//! * [`MqttSub`]: an MQTT 3.1.1 client over WebSocket (rumqttc with
//!   `Transport::Ws`) for Mosquitto's own WebSocket listener: SUBSCRIBE,
//!   wait for the SUBACK, then poll PUBLISH packets. The same client over
//!   plain TCP serves as a reference (Mosquitto without WebSocket).
//!
//! Both (and [`crate::rawmqtt::RawMqttSub`]) are a [`Subscriber`]: they hand
//! each received payload to a [`Recorder`], which finds the send timestamp
//! with a substring search (no JSON parse), or hold the connection idle.
//!
//! [`connect_ws`] and [`subscribe`] are the two steps of a bridge client's
//! setup, for clients that then behave otherwise (the abuse scenario's).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode,
    Transport,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::stats::Recorder;

/// A connected subscriber, ready to run.
pub trait Subscriber: Sized + Send + 'static {
    /// Records every message until the connection ends (or the task is
    /// aborted). No reconnect: a lost connection is a result.
    fn receive(self, rec: Recorder) -> impl Future<Output = ()> + Send;
    /// Holds the connection open (answering pings) until aborted.
    fn idle(self) -> impl Future<Output = ()> + Send;
}

/// A bridge WebSocket as the bench's clients use it.
pub type BridgeWs = WebSocketStream<TcpStream>;

/// Opens `ws://ADDR/ws`. `read_buffer` is tungstenite's read buffer (small
/// for idle connections, larger for fan-out); `recv_buffer`, when given, is
/// the TCP receive buffer (a tiny one leaves a client that stops reading no
/// room to hide the server's backlog in).
pub async fn connect_ws(
    addr: SocketAddr,
    read_buffer: usize,
    recv_buffer: Option<u32>,
) -> Result<BridgeWs, String> {
    let tcp = match recv_buffer {
        None => TcpStream::connect(addr).await,
        Some(bytes) => {
            let socket = TcpSocket::new_v4().map_err(|e| format!("TCP socket: {e}"))?;
            socket
                .set_recv_buffer_size(bytes)
                .map_err(|e| format!("TCP receive buffer: {e}"))?;
            socket.connect(addr).await
        }
    }
    .map_err(|e| format!("TCP connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(format!("ws://{addr}/ws"), tcp, Some(config))
            .await
            .map_err(|e| format!("WebSocket handshake with {addr}: {e}"))?;
    Ok(ws)
}

/// Subscribes to `channel` (request id 1) and waits for the ack.
pub async fn subscribe(ws: &mut BridgeWs, channel: &str) -> Result<(), String> {
    let request = serde_json::json!({"action": "subscribe", "channel": channel, "id": 1});
    ws.send(Message::Text(request.to_string().into()))
        .await
        .map_err(|e| format!("sending subscribe: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let v: serde_json::Value = serde_json::from_str(text.as_str())
                    .map_err(|e| format!("bad frame {text:?}: {e}"))?;
                match v["type"].as_str() {
                    Some("ack") if v["id"] == 1 => return Ok(()),
                    Some("error") => return Err(format!("subscribe refused: {text}")),
                    _ => {}
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("waiting for the ack: {e}")),
            None => return Err("connection closed before the ack".into()),
        }
    }
}

/// A connected, subscribed bridge WebSocket client.
pub struct BridgeSub {
    ws: BridgeWs,
}

impl BridgeSub {
    /// Connects to `ws://ADDR/ws` ([`connect_ws`]), subscribes to `channel`
    /// and waits for the ack.
    pub async fn connect(
        addr: SocketAddr,
        channel: &str,
        read_buffer: usize,
    ) -> Result<BridgeSub, String> {
        let mut ws = connect_ws(addr, read_buffer, None).await?;
        subscribe(&mut ws, channel).await?;
        Ok(BridgeSub { ws })
    }
}

impl Subscriber for BridgeSub {
    async fn receive(mut self, rec: Recorder) {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => rec.bridge_frame(text.as_bytes()),
                Some(Ok(Message::Close(frame))) => {
                    rec.ended(format!("closed by the server: {frame:?}"));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    rec.ended(format!("read error: {e}"));
                    return;
                }
                None => {
                    rec.ended("connection closed".into());
                    return;
                }
            }
        }
    }

    async fn idle(mut self) {
        while let Some(Ok(_)) = self.ws.next().await {}
    }
}

/// How an MQTT subscriber reaches the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttTransport {
    /// `ws://127.0.0.1:PORT/mqtt`, subprotocol `mqtt`.
    WebSocket,
    /// Plain MQTT over TCP.
    Tcp,
}

/// A connected, subscribed MQTT client (over WebSocket or TCP).
pub struct MqttSub {
    // Kept: dropping the last client handle ends the event loop.
    _client: AsyncClient,
    eventloop: EventLoop,
}

impl MqttSub {
    /// Connects to 127.0.0.1:`port` (`ws://127.0.0.1:PORT/mqtt` with
    /// subprotocol `mqtt` over WebSocket), subscribes to `topic` at `qos` and
    /// waits for the SUBACK.
    pub async fn connect(
        transport: MqttTransport,
        port: u16,
        id: &str,
        topic: &str,
        qos: QoS,
    ) -> Result<MqttSub, String> {
        let mut opts = match transport {
            MqttTransport::WebSocket => {
                let mut o = MqttOptions::new(id, format!("ws://127.0.0.1:{port}/mqtt"), port);
                o.set_transport(Transport::Ws);
                o
            }
            MqttTransport::Tcp => MqttOptions::new(id, "127.0.0.1", port),
        };
        opts.set_keep_alive(Duration::from_secs(60));
        opts.set_clean_session(true);
        opts.set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 4);
        client
            .subscribe(topic, qos)
            .await
            .map_err(|e| format!("queueing SUBSCRIBE: {e}"))?;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        return Err("SUBSCRIBE refused by the broker".into());
                    }
                    return Ok(MqttSub {
                        _client: client,
                        eventloop,
                    });
                }
                Ok(_) => {}
                Err(e) => return Err(format!("MQTT ({transport:?}) to port {port}: {e}")),
            }
        }
    }
}

impl Subscriber for MqttSub {
    async fn receive(mut self, rec: Recorder) {
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => rec.message(&p.payload),
                Ok(_) => {}
                Err(e) => {
                    rec.ended(describe(&e));
                    return;
                }
            }
        }
    }

    async fn idle(mut self) {
        while self.eventloop.poll().await.is_ok() {}
    }
}

fn describe(e: &ConnectionError) -> String {
    format!("MQTT connection: {e}")
}
