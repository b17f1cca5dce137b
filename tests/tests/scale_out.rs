//! Scale-out: two `bridge serve` nodes on one Mosquitto. The broker is the
//! backplane; no node knows the other.

use serde_json::json;
use tests::{Bridge, Client, Device, Mosquitto, Opts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_one_broker() {
    let m = Mosquitto::start();
    let node_a = Bridge::external(&m, Opts::default());
    let node_b = Bridge::external(&m, Opts::default());
    let mut on_a = Client::connect(&node_a.ws_url()).await;
    let mut on_b = Client::connect(&node_b.ws_url()).await;
    let mut also_b = Client::connect(&node_b.ws_url()).await;
    // Overlapping filters on both nodes.
    on_a.subscribe("room/#").await;
    on_a.subscribe("room/1").await;
    on_b.subscribe("room/+").await;
    on_b.subscribe("+/1").await;
    also_b.subscribe("room/1").await;

    // A publish through node A reaches subscribers on node B, once each.
    on_a.publish("room/1", json!({"from":"a"})).await;
    for c in [&mut on_a, &mut on_b, &mut also_b] {
        assert_eq!(c.next_message().await["data"], json!({"from":"a"}));
    }
    // And the other way round, and from a device.
    also_b.publish("room/1", json!({"from":"b"})).await;
    let mut dev = Device::connect(m.port, "dev").await;
    dev.publish("room/1", r#"{"from":"dev"}"#, 1, false).await;
    for c in [&mut on_a, &mut on_b, &mut also_b] {
        assert_eq!(c.next_message().await["data"], json!({"from":"b"}));
        assert_eq!(c.next_message().await["data"], json!({"from":"dev"}));
        c.expect_silence().await;
    }
}
