//! The liveness layer stands alone: it could ship as its own crate.
//!
//! This test compiles `src/liveness/` as a module of a crate that holds
//! nothing else of tonic-heartbeat, so an import of any other module of the
//! crate (`crate::protocol`, `crate::registry`, …) fails to build here, and it
//! checks that the module's own imports come from a short list of crates.
// The module's API is exercised by `tests/liveness.rs`; here it only has to build.
#![allow(dead_code, unused_imports)]

#[path = "../src/liveness/mod.rs"]
mod liveness;

use std::time::Duration;

use tower::{Layer, ServiceExt};

/// The crates the liveness layer may build on.
const ALLOWED: &[&str] = &[
    "std",
    "super",
    "self",
    "bytes",
    "http",
    "http_body",
    "parking_lot",
    "pin_project_lite",
    "tokio",
    "tower",
];

/// Tests that the layer, compiled from its source alone, wraps a service
/// and answers a call through it.
#[tokio::test]
async fn the_layer_builds_and_serves_alone() {
    let layer = liveness::LivenessLayer::new(Duration::from_secs(30));
    let service = layer.layer(tower::service_fn(
        |_: http::Request<liveness::InboundBody<http_body_util::Empty<bytes::Bytes>>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        },
    ));
    let response = service
        .oneshot(http::Request::new(http_body_util::Empty::new()))
        .await
        .expect("infallible");
    assert_eq!(response.status(), http::StatusCode::OK);
}

/// Tests that every `use` in the liveness module, re-exports included,
/// names an allowed crate or one of the module's own files.
#[test]
fn the_layer_uses_only_its_own_crates() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/liveness");
    let mod_rs = std::fs::read_to_string(format!("{dir}/mod.rs")).expect("mod.rs");
    let own: Vec<&str> = mod_rs
        .lines()
        .filter_map(|line| line.strip_prefix("mod ")?.strip_suffix(';'))
        .collect();
    assert!(own.contains(&"wheel"), "the module's files: {own:?}");
    for entry in std::fs::read_dir(dir).expect("the module's directory") {
        let path = entry.expect("an entry").path();
        let source = std::fs::read_to_string(&path).expect("a source file");
        for line in source.lines().map(str::trim_start) {
            let line = ["pub(crate) ", "pub(super) ", "pub "]
                .iter()
                .find_map(|visibility| line.strip_prefix(visibility))
                .unwrap_or(line);
            let Some(rest) = line.strip_prefix("use ") else {
                continue;
            };
            let root = rest.split([':', ';', ' ', '{']).next().unwrap_or_default();
            assert!(
                ALLOWED.contains(&root) || own.contains(&root),
                "{} uses {root:?}, outside the layer's own crates: {line}",
                path.display()
            );
        }
    }
}
