//! CloudWatch Embedded Metric Format: one JSON log line per invocation that
//! CloudWatch turns into metrics without any API call (namespace
//! `ChannelBridge`, dimension `Function`).
//!
//! Each metric a function declares is a custom metric, billed per month
//! (about $0.30 each); the line's other fields (*properties*) cost nothing
//! beyond the log line and are still there for Logs Insights. So only what
//! an alarm or a dashboard needs is declared a metric.

use serde_json::{json, Map, Value};

pub const NAMESPACE: &str = "ChannelBridge";

/// One metric: name, value, unit (`Count`, `Milliseconds`, `Bytes`).
pub type Metric<'a> = (&'a str, f64, &'a str);

/// A field of the line that is not a metric: name, value.
pub type Property<'a> = (&'a str, f64);

/// The EMF line for `metrics` of `function` at `timestamp_ms`, with
/// `properties` alongside.
pub fn line(
    function: &str,
    timestamp_ms: i64,
    metrics: &[Metric],
    properties: &[Property],
) -> String {
    let definitions: Vec<Value> = metrics
        .iter()
        .map(|(name, _, unit)| json!({"Name": name, "Unit": unit}))
        .collect();
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["Function"]],
                "Metrics": definitions,
            }]
        }),
    );
    root.insert("Function".into(), Value::from(function));
    for (name, value, _) in metrics {
        root.insert((*name).to_string(), json!(value));
    }
    for (name, value) in properties {
        root.insert((*name).to_string(), json!(value));
    }
    Value::Object(root).to_string()
}

/// Writes the line to stdout, where the Lambda runtime sends it to CloudWatch Logs.
pub fn emit(function: &str, metrics: &[Metric], properties: &[Property]) {
    println!(
        "{}",
        line(function, crate::now_millis(), metrics, properties)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape() {
        let l = line(
            "iot-fanout",
            7,
            &[
                ("Delivered", 3.0, "Count"),
                ("Duration", 1.5, "Milliseconds"),
            ],
            &[("Gone", 2.0)],
        );
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["_aws"]["Timestamp"], 7);
        assert_eq!(v["_aws"]["CloudWatchMetrics"][0]["Namespace"], NAMESPACE);
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Metrics"][1]["Name"],
            "Duration"
        );
        assert_eq!(v["Delivered"], 3.0);
        assert_eq!(v["Function"], "iot-fanout");
        // A property is in the line, not among the metrics.
        assert_eq!(v["Gone"], 2.0);
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Metrics"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
