//! The built binaries end to end: each runs its real `lambda_runtime` loop
//! against a local Lambda Runtime API, with the AWS SDK clients pointed at
//! moto (DynamoDB) and the recording stand-in (`@connections`, IoT Data
//! Plane) through `AWS_ENDPOINT_URL_*`.

mod support;

use std::process::Command;

use serde_json::{json, Value};
use support::*;

const SECRET: &str = "scenario-secret-0123456789abcdef0123";

struct Deployment {
    standin: StandIn,
    ddb: aws_sdk_dynamodb::Client,
    table: String,
    authorizer: LambdaProcess,
    handler: LambdaProcess,
    fanout: LambdaProcess,
}

async fn deploy() -> Deployment {
    let standin = StandIn::start().await;
    let ddb = aws_sdk_dynamodb::Client::new(&sdk(dynamodb_endpoint()));
    let table = create_table(&ddb).await;
    let base = aws_env(dynamodb_endpoint(), &standin);
    let with = |extra: &[(&str, String)]| {
        let mut env = base.clone();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        env
    };
    let authorizer = LambdaProcess::start(
        env!("CARGO_BIN_EXE_ws-authorizer"),
        "ws-authorizer",
        &with(&[("BRIDGE_JWT_SECRET", SECRET.into())]),
    )
    .await;
    let handler = LambdaProcess::start(
        env!("CARGO_BIN_EXE_ws-handler"),
        "ws-handler",
        &with(&[
            ("TABLE_NAME", table.clone()),
            ("BRIDGE_AUTH", "token".into()),
            ("BRIDGE_JWT_SECRET", SECRET.into()),
        ]),
    )
    .await;
    // The fan-out finds @connections through AWS_ENDPOINT_URL_APIGATEWAYMANAGEMENTAPI,
    // which wins over WEBSOCKET_ENDPOINT.
    let fanout = LambdaProcess::start(
        env!("CARGO_BIN_EXE_iot-fanout"),
        "iot-fanout",
        &with(&[
            ("TABLE_NAME", table.clone()),
            ("WEBSOCKET_ENDPOINT", "https://unused.invalid/prod".into()),
            (
                "AWS_ENDPOINT_URL_APIGATEWAYMANAGEMENTAPI",
                standin.websocket_endpoint(),
            ),
        ]),
    )
    .await;
    Deployment {
        standin,
        ddb,
        table,
        authorizer,
        handler,
        fanout,
    }
}

impl Deployment {
    /// A browser connecting: the authorizer, then `$connect` with the
    /// context API Gateway passes on. The handshake status.
    async fn connect(&self, id: &str, token: Option<&str>) -> u16 {
        let answer = match self.authorizer.invoke(authorizer_event(token, None)).await {
            Ok(a) => a,
            Err(e) => {
                assert_eq!(e["errorMessage"], "Unauthorized", "{e}");
                return 401;
            }
        };
        if answer["policyDocument"]["Statement"][0]["Effect"] != "Allow" {
            return 403;
        }
        let mut context = answer["context"].clone();
        context["principalId"] = answer["principalId"].clone();
        let r = self
            .handler
            .invoke(ws_event("$connect", id, None, Some(context)))
            .await
            .expect("$connect answers");
        r["statusCode"].as_u64().unwrap() as u16
    }

    /// One frame through `$default`: the route response body.
    async fn send(&self, id: &str, frame: &str) -> Option<Value> {
        let r = self
            .handler
            .invoke(ws_event("$default", id, Some(frame), None))
            .await
            .expect("$default answers");
        assert_eq!(r["statusCode"], 200);
        r["body"].as_str().map(|b| serde_json::from_str(b).unwrap())
    }

    async fn device(&self, topic: &str, payload: &[u8]) -> Value {
        self.fanout
            .invoke(rule_event(topic, payload))
            .await
            .expect("the fan-out succeeds")
    }

    async fn keys(&self) -> Vec<String> {
        keys(&self.ddb, &self.table).await
    }
}

#[tokio::test]
async fn two_browsers_a_device_and_a_gone_connection() {
    let mut d = deploy().await;
    for p in [&mut d.authorizer, &mut d.handler, &mut d.fanout] {
        let t = p.init_time().await;
        eprintln!("init (process start to first /next): {t:?}");
    }
    let now = now_secs();
    let alice = hs256_token(
        SECRET,
        json!({"sub":"alice","exp":now+600,
               "channels":{"subscribe":["fleet/+/telemetry","+/d1/telemetry"],"publish":["fleet/+/commands"]}}),
    );
    let bob = hs256_token(
        SECRET,
        json!({"sub":"bob","exp":now+600,"channels":{"subscribe":["fleet/#"]}}),
    );

    // Refused handshakes.
    assert_eq!(d.connect("x1", None).await, 401);
    let forged = hs256_token(
        "not-the-secret",
        json!({"sub":"eve","exp":now+600,"channels":{"subscribe":["#"]}}),
    );
    assert_eq!(d.connect("x2", Some(&forged)).await, 403);
    let expired = hs256_token(SECRET, json!({"sub":"alice","exp":now-60}));
    assert_eq!(d.connect("x3", Some(&expired)).await, 403);
    assert!(
        d.keys().await.is_empty(),
        "refused connections store nothing"
    );

    assert_eq!(d.connect("A", Some(&alice)).await, 200);
    assert_eq!(d.connect("B", Some(&bob)).await, 200);

    // Overlapping wildcards.
    assert_eq!(
        d.send(
            "A",
            r#"{"action":"subscribe","channel":"fleet/+/telemetry","id":1}"#
        )
        .await,
        Some(json!({"type":"ack","id":1}))
    );
    assert_eq!(
        d.send(
            "A",
            r#"{"action":"subscribe","channel":"+/d1/telemetry","id":2}"#
        )
        .await,
        Some(json!({"type":"ack","id":2}))
    );
    assert_eq!(
        d.send(
            "B",
            r##"{"action":"subscribe","channel":"fleet/#","id":"b1"}"##
        )
        .await,
        Some(json!({"type":"ack","id":"b1"}))
    );

    // A token cannot escalate: not by asking, not by extra fields.
    for frame in [
        r##"{"action":"subscribe","channel":"fleet/#","id":3}"##,
        r##"{"action":"subscribe","channel":"#","id":3}"##,
        r#"{"action":"subscribe","channel":"fleet/+/+","id":3,"permissions":{"subscribe":"all"}}"#,
        r#"{"action":"publish","channel":"fleet/d1/telemetry","data":1,"id":3}"#,
    ] {
        let r = d.send("A", frame).await.unwrap();
        assert_eq!(r["code"], "forbidden", "{frame}");
        assert_eq!(r["id"], 3);
    }
    assert_eq!(
        d.send("A", r#"{"action":"ping","id":7}"#).await,
        Some(json!({"type":"pong","id":7}))
    );

    // A device message reaches exactly the right connections, once each.
    let report = d.device("fleet/d1/telemetry", br#"{"temp":21.5}"#).await;
    assert_eq!(report["delivered"], 2, "{report}");
    let mut posted = d.standin.posted();
    posted.sort_by(|a, b| a.0.cmp(&b.0));
    let frame =
        json!({"type":"message","channel":"fleet/d1/telemetry","data":{"temp":21.5},"mid":RULE_ID});
    assert_eq!(
        posted,
        vec![("A".to_string(), frame.clone()), ("B".to_string(), frame)]
    );
    // Looked up: the topic itself, its literal-prefix ancestors (#, fleet/#,
    // fleet/d1/#, fleet/d1/telemetry/#) and the registered `+` filters that
    // match it (fleet/+/telemetry, +/d1/telemetry).
    assert_eq!(report["filters"], 7);
    d.standin.clear();
    d.device("fleet/d2/status", b"up").await;
    assert_eq!(
        d.standin.posted(),
        vec![(
            "B".to_string(),
            json!({"type":"message","channel":"fleet/d2/status","data":"up","encoding":"text","mid":RULE_ID})
        )]
    );

    // A web publish reaches IoT Core with its qos and retain.
    d.standin.clear();
    let r = d
        .send("A", r#"{"action":"publish","channel":"fleet/d1/commands","data":{"reboot":true},"qos":0,"retain":true,"id":"c1"}"#)
        .await;
    assert_eq!(r, Some(json!({"type":"ack","id":"c1"})));
    let p = d.standin.publishes();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].topic().as_deref(), Some("fleet/d1/commands"));
    assert_eq!(p[0].query_param("qos").as_deref(), Some("0"));
    assert_eq!(p[0].query_param("retain").as_deref(), Some("true"));
    assert_eq!(p[0].body, br#"{"reboot":true}"#);

    // B's browser went away without a $disconnect: its post answers 410, its rows go.
    d.standin.clear();
    d.standin.set_gone("B");
    let report = d.device("fleet/d1/telemetry", b"1").await;
    assert_eq!(
        (report["delivered"].as_u64(), report["gone"].as_u64()),
        (Some(1), Some(1))
    );
    let keys = d.keys().await;
    assert!(
        !keys
            .iter()
            .any(|k| k.contains("#B") || k.ends_with("|B") || k.contains("fleet/#")),
        "{keys:?}"
    );
    d.standin.clear();
    d.device("fleet/d1/telemetry", b"2").await;
    assert_eq!(d.standin.posted().len(), 1);
    assert_eq!(d.standin.posted()[0].0, "A");

    // Metrics: one EMF line per fan-out invocation.
    let metrics = d.fanout.metrics_after(4).await;
    assert_eq!(metrics.len(), 4);
    let gone_line = &metrics[2];
    assert_eq!(
        gone_line["_aws"]["CloudWatchMetrics"][0]["Namespace"],
        "ChannelBridge"
    );
    assert_eq!(
        (gone_line["Delivered"].as_f64(), gone_line["Gone"].as_f64()),
        (Some(1.0), Some(1.0))
    );
    assert!(gone_line["DynamoDbRequests"].as_f64().unwrap() >= 2.0);

    // $disconnect deletes every row of the connection.
    let r = d
        .handler
        .invoke(ws_event("$disconnect", "A", None, None))
        .await
        .unwrap();
    assert_eq!(r["statusCode"], 200);
    assert_eq!(d.keys().await, vec!["wildcards|version"]);

    // Bad input is an error answer, never a crash.
    let e = d.fanout.invoke(json!({"nope": true})).await.unwrap_err();
    assert!(
        e["errorMessage"]
            .as_str()
            .unwrap()
            .contains("not a topic rule event"),
        "{e}"
    );
    let e = d
        .handler
        .invoke(json!({"requestContext": {}}))
        .await
        .unwrap_err();
    assert!(!e["errorMessage"].as_str().unwrap().is_empty());
    assert!(
        d.handler.exited().is_none()
            && d.fanout.exited().is_none()
            && d.authorizer.exited().is_none()
    );
    // Still serving: a new connection is answered.
    assert_eq!(d.connect("C", Some(&alice)).await, 200);
    assert_eq!(
        d.send("C", r#"{"action":"ping"}"#).await,
        Some(json!({"type":"pong"}))
    );
    // The disconnected one is told so, with a clear error.
    let gone = d.send("A", r#"{"action":"ping"}"#).await.unwrap();
    assert_eq!(gone["code"], "unavailable", "{gone}");
}

#[test]
fn a_misconfigured_function_says_what_is_missing() {
    for (bin, expected) in [
        (env!("CARGO_BIN_EXE_ws-handler"), "TABLE_NAME is not set"),
        (env!("CARGO_BIN_EXE_iot-fanout"), "TABLE_NAME is not set"),
        (
            env!("CARGO_BIN_EXE_ws-authorizer"),
            "BRIDGE_JWT_SECRET is not set",
        ),
    ] {
        let out = Command::new(bin)
            .env_clear()
            .env(
                "AWS_LAMBDA_RUNTIME_API",
                format!("127.0.0.1:{}", free_port()),
            )
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{bin}: {stderr}");
    }
}
