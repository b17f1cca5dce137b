//! The device side: an ordinary MQTT client (rumqttc) on the broker that
//! publishes, subscribes and collects what it receives.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::sync::mpsc;

use crate::processes::{free_port, QUIET, WAIT};

/// A device: an ordinary MQTT client (rumqttc) on the broker.
pub struct Device {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<rumqttc::Publish>,
    subacks: mpsc::UnboundedReceiver<()>,
    pubacks: mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    pub async fn connect(port: u16, id: &str) -> Device {
        let mut opts = MqttOptions::new(format!("{id}-{}", free_port()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        opts.set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(opts, 100_000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (stx, subacks) = mpsc::unbounded_channel();
        let (ptx, pubacks) = mpsc::unbounded_channel();
        let (ctx, mut connected) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = ctx.send(());
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = stx.send(());
                    }
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        let _ = ptx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, connected.recv())
            .await
            .expect("device connect")
            .unwrap();
        Device {
            client,
            rx,
            subacks,
            pubacks,
            task,
        }
    }

    /// Publishes and, for QoS 1, waits for the broker's PUBACK.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos: u8,
        retain: bool,
    ) {
        let q = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        self.client
            .publish(topic, q, retain, payload.into())
            .await
            .unwrap();
        if qos == 1 {
            tokio::time::timeout(WAIT, self.pubacks.recv())
                .await
                .expect("puback")
                .unwrap();
        }
    }

    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, self.subacks.recv())
            .await
            .expect("suback")
            .unwrap();
    }

    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("no MQTT message")
            .unwrap()
    }

    pub async fn expect_silence(&mut self) {
        if let Ok(Some(p)) = tokio::time::timeout(QUIET, self.rx.recv()).await {
            panic!("expected no MQTT message, got {p:?}");
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}
