//! Client credentials (contract rule 1): a token is needed before any frame,
//! and it names the client ids its holder may say Hello as.

mod support;

use std::time::Duration;

use support::*;
use tonic::Code;
use tonic_heartbeat::{
    client::Client,
    credentials::{ClientCredentials, CredentialTable},
    protocol::pb,
    ServerConfig,
};

fn config_with(credentials: &str) -> ServerConfig {
    let table = CredentialTable::parse(credentials).expect("valid credentials");
    ServerConfig {
        client_credentials: Some(ClientCredentials::from_table(table)),
        ..fast_config()
    }
}

const CREDENTIALS: &str = "worker-token worker-*\nprobe-token \"\",probe\n";

/// Tests that a stream with no token, or an unknown one, is refused with
/// UNAUTHENTICATED before any frame, and that the refusals are counted.
#[tokio::test]
async fn streams_without_a_known_token_are_unauthenticated() {
    let server = TestServer::start(config_with(CREDENTIALS)).await;
    let missing = RawSession::open(server.addr).await.err().expect("refused");
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    assert!(
        missing.message().contains("send authorization: Bearer"),
        "{missing:?}"
    );
    let unknown = RawSession::open_with_token(server.addr, "guess")
        .await
        .err()
        .expect("refused");
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");
    assert!(
        unknown.message().contains("not one this server knows"),
        "{unknown:?}"
    );
    let metrics = server.handle.metrics().render(false).0;
    assert!(
        metrics.contains("heartbeat_admission_rejections_total{reason=\"unauthenticated\"} 2\n"),
        "{metrics}"
    );
}

/// Tests that a Hello whose client id the token does not allow is refused
/// with PERMISSION_DENIED and no frame, and never reaches presence; one it
/// allows opens.
#[tokio::test]
async fn a_hello_outside_the_token_is_permission_denied() {
    let server = TestServer::start(config_with(CREDENTIALS)).await;
    let mut events = server.handle.subscribe();
    for (token, client_id) in [
        ("worker-token", "probe"),
        ("worker-token", ""),
        ("probe-token", "worker-1"),
    ] {
        let mut session = RawSession::open_with_token(server.addr, token)
            .await
            .expect("admitted");
        session
            .send(pb::heartbeat_request::Frame::Hello(pb::Hello {
                client_id: client_id.into(),
                ..Default::default()
            }))
            .await;
        let ended = session.ended().await;
        assert_eq!(ended.status.code(), Code::PermissionDenied, "{ended:?}");
        assert!(ended.goodbye.is_none(), "no frame: {ended:?}");
        assert!(ended
            .status
            .message()
            .contains("not one your credential allows"));
    }
    assert!(server.handle.registry().is_empty());
    let mut held = Vec::new();
    for (token, client_id) in [("worker-token", "worker-7"), ("probe-token", "")] {
        let mut session = RawSession::open_with_token(server.addr, token)
            .await
            .expect("admitted");
        let welcome = session.say_hello(client_id).await;
        let opened = next_change(&mut events).await;
        assert_eq!(
            opened.event.session().identity.session_id,
            welcome.session_id
        );
        held.push(session);
    }
}

/// Tests that the library's client presents its bearer token and lives, and
/// that without it the same client is refused.
#[tokio::test]
async fn the_client_presents_its_token() {
    let server = TestServer::start(config_with(CREDENTIALS)).await;
    let client = Client::builder(server.url())
        .client_id("worker-9")
        .bearer_token("worker-token")
        .connect()
        .expect("client");
    within(WAIT, client.live())
        .await
        .expect("live with its token");
    client.close().await.expect("close");
}

/// Tests that `heartbeat serve --client-credentials` reloads its file on
/// SIGHUP: a token added to the file works afterwards, and a removed one
/// stops working. (That a broken file leaves the credentials in force is a
/// unit test of `ClientCredentials::reload`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_credentials_file_reloads_on_sighup() {
    let dir = std::env::temp_dir().join(format!("hb-cred-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("credentials");
    std::fs::write(&file, "old-token *\n").expect("write");
    let (child, addr) =
        spawn_server_process(&["--client-credentials", file.to_str().expect("utf-8 path")]);
    let open = |token: &'static str| async move {
        RawSession::open_with_token(addr, token).await.map(|_| ())
    };
    assert!(open("old-token").await.is_ok());
    assert_eq!(
        open("new-token").await.err().map(|status| status.code()),
        Some(Code::Unauthenticated)
    );
    std::fs::write(&file, "new-token *\n").expect("write");
    signal(&child, "-HUP");
    within(WAIT, async {
        while open("new-token").await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(open("old-token").await.is_err(), "the old token is gone");
    signal(&child, "-KILL");
    let _ = std::fs::remove_dir_all(&dir);
}
