//! CloudWatch Embedded Metric Format: one JSON log line per invocation that
//! CloudWatch turns into metrics without any API call (namespace
//! `ChannelBridge`, dimension `Function`).

use serde_json::{json, Map, Value};

pub const NAMESPACE: &str = "ChannelBridge";

/// One metric: name, value, unit (`Count`, `Milliseconds`, `Bytes`).
pub type Metric<'a> = (&'a str, f64, &'a str);

/// The EMF line for `metrics` of `function` at `timestamp_ms`.
pub fn line(function: &str, timestamp_ms: i64, metrics: &[Metric]) -> String {
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
    Value::Object(root).to_string()
}

/// Writes the line to stdout, where the Lambda runtime sends it to CloudWatch Logs.
pub fn emit(function: &str, metrics: &[Metric]) {
    println!("{}", line(function, crate::now_millis(), metrics));
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
    }
}
