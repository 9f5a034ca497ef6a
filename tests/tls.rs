//! TLS and mutual TLS, with certificates made at test time: the happy paths,
//! the refusals (a client that does not trust the server, no client
//! certificate, one from another CA, an expired one), and a reload that
//! keeps sessions.

mod support;

use std::{path::Path, time::Duration};

use rcgen::ExtendedKeyUsagePurpose;
use support::{
    certs::{Pems, TestCa},
    *,
};
use tonic_heartbeat::{
    client::{secure_endpoint, Client, ClientEvent, ClientTls, LossReason},
    protocol::pb::heartbeat_service_client::HeartbeatServiceClient,
    tls::{ServerTls, TlsFiles},
    ServerConfig,
};

/// A server certificate for 127.0.0.1, and a TLS server config on it.
fn tls_config(pems: &Pems, ca: &TestCa, client_ca: Option<&Path>) -> ServerConfig {
    let (cert, key) = ca.server_leaf();
    let files = TlsFiles {
        cert: pems.write("server.pem", &cert),
        key: pems.write("server.key", &key),
        client_ca: client_ca.map(Path::to_owned),
    };
    ServerConfig {
        tls: Some(ServerTls::from_files(files).expect("valid TLS files")),
        ..fast_config()
    }
}

fn https(server: &TestServer) -> String {
    format!("https://{}", server.addr)
}

/// Whether a heartbeat call over TLS with `tls` gets through to the server.
async fn call_succeeds(url: &str, tls: &ClientTls) -> Result<(), String> {
    let endpoint = secure_endpoint(url, Some(tls)).map_err(|error| error.to_string())?;
    let channel = within(WAIT, endpoint.connect())
        .await
        .map_err(|error| format!("{error:?}"))?;
    let mut client = HeartbeatServiceClient::new(channel);
    let (_outbound, requests) = tokio::sync::mpsc::channel(1);
    within(
        WAIT,
        client.heartbeat(tokio_stream::wrappers::ReceiverStream::new(requests)),
    )
    .await
    .map(|_| ())
    .map_err(|status| format!("{status:?}"))
}

/// Tests that a client trusting the server's CA holds a session over TLS,
/// and that one trusting another CA cannot connect.
#[tokio::test]
async fn tls_sessions_and_an_untrusted_server() {
    let pems = Pems::new("plain");
    let ca = TestCa::new("server ca");
    let server = TestServer::start(tls_config(&pems, &ca, None)).await;
    let trusted = ClientTls {
        ca: Some(pems.write("ca.pem", &ca.pem)),
        ..ClientTls::default()
    };
    let client = Client::builder(https(&server))
        .client_id("over-tls")
        .tls(trusted)
        .connect()
        .expect("client");
    within(WAIT, client.live()).await.expect("live over TLS");
    client.close().await.expect("close");

    let other = TestCa::new("other ca");
    let untrusting = ClientTls {
        ca: Some(pems.write("other.pem", &other.pem)),
        ..ClientTls::default()
    };
    let refused = call_succeeds(&https(&server), &untrusting).await;
    assert!(refused.is_err(), "a client must not trust an unknown CA");
}

/// Tests that with a client CA, a client certificate from it is required:
/// one gets through; none, one from another CA, or an expired one fails
/// the handshake, and the failures are counted.
#[tokio::test]
async fn mutual_tls_requires_a_valid_client_certificate() {
    let pems = Pems::new("mutual");
    let ca = TestCa::new("one ca");
    let client_ca = pems.write("client-ca.pem", &ca.pem);
    let server = TestServer::start(tls_config(&pems, &ca, Some(&client_ca))).await;
    let url = https(&server);
    let with_cert = |name: &str, issuer: &TestCa, expired: bool| {
        let (cert, key) = issuer.leaf(&["worker-1"], ExtendedKeyUsagePurpose::ClientAuth, expired);
        ClientTls {
            ca: Some(client_ca.clone()),
            cert: Some(pems.write(&format!("{name}.pem"), &cert)),
            key: Some(pems.write(&format!("{name}.key"), &key)),
        }
    };
    call_succeeds(&url, &with_cert("good", &ca, false))
        .await
        .expect("a valid client certificate gets through");

    let other = TestCa::new("another ca");
    let refusals = [
        (
            "no certificate",
            ClientTls {
                ca: Some(client_ca.clone()),
                ..ClientTls::default()
            },
        ),
        ("another CA", with_cert("foreign", &other, false)),
        ("expired", with_cert("expired", &ca, true)),
    ];
    for (what, tls) in &refusals {
        assert!(
            call_succeeds(&url, tls).await.is_err(),
            "a client with {what} must be refused"
        );
    }
    let metrics = server.handle.metrics().render(false).0;
    let failed: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("heartbeat_tls_handshakes_failed_total "))
        .and_then(|count| count.parse().ok())
        .expect("the counter");
    assert!(failed >= 3, "{failed} failed handshakes counted");
}

/// Tests that `heartbeat serve` reloads its certificate on SIGHUP: a client
/// trusting only the new CA gets through afterwards, and a session opened
/// before the reload is not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_dropping_sessions() {
    let pems = Pems::new("reload");
    let first = TestCa::new("first ca");
    let (cert, key) = first.leaf(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth, false);
    let cert_path = pems.write("server.pem", &cert);
    let key_path = pems.write("server.key", &key);
    let (child, addr) = spawn_server_process(&[
        "--tls-cert",
        cert_path.to_str().expect("utf-8"),
        "--tls-key",
        key_path.to_str().expect("utf-8"),
    ]);
    let url = format!("https://{addr}");
    let old = Client::builder(url.clone())
        .client_id("before-reload")
        .tls(ClientTls {
            ca: Some(pems.write("first.pem", &first.pem)),
            ..ClientTls::default()
        })
        .connect()
        .expect("client");
    let mut old_events = old.events();
    within(WAIT, old.live()).await.expect("live");

    let second = TestCa::new("second ca");
    let (cert, key) = second.leaf(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth, false);
    std::fs::write(&cert_path, cert).expect("new cert");
    std::fs::write(&key_path, key).expect("new key");
    signal(&child, "-HUP");
    let trusting_second = ClientTls {
        ca: Some(pems.write("second.pem", &second.pem)),
        ..ClientTls::default()
    };
    within(WAIT, async {
        while call_succeeds(&url, &trusting_second).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The old session saw no loss through all of it.
    while let Ok(Some(event)) = tokio::time::timeout(Duration::ZERO, old_events.next()).await {
        assert!(
            !matches!(
                event,
                ClientEvent::Lost {
                    reason: LossReason::Transport { .. } | LossReason::Timeout { .. }
                }
            ),
            "the old session was dropped: {event:?}"
        );
    }
    assert!(matches!(
        old.state(),
        tonic_heartbeat::client::ClientState::Live { .. }
    ));
    signal(&child, "-KILL");
}

/// Tests that under mutual TLS with client ids from certificates, a client
/// may say Hello as a name its certificate holds and nothing else.
#[tokio::test]
async fn client_certificates_name_their_client_ids() {
    let pems = Pems::new("ids");
    let ca = TestCa::new("id ca");
    let client_ca = pems.write("client-ca.pem", &ca.pem);
    let config = ServerConfig {
        client_ids_from_certificate: true,
        ..tls_config(&pems, &ca, Some(&client_ca))
    };
    let server = TestServer::start(config).await;
    let (cert, key) = ca.leaf(&["worker-1"], ExtendedKeyUsagePurpose::ClientAuth, false);
    let tls = ClientTls {
        ca: Some(client_ca.clone()),
        cert: Some(pems.write("worker.pem", &cert)),
        key: Some(pems.write("worker.key", &key)),
    };
    let named = Client::builder(https(&server))
        .client_id("worker-1")
        .tls(tls.clone())
        .connect()
        .expect("client");
    within(WAIT, named.live())
        .await
        .expect("its own name is allowed");
    named.close().await.expect("close");

    let squatter = Client::builder(https(&server))
        .client_id("worker-2")
        .tls(tls)
        .connect()
        .expect("client");
    let mut events = squatter.events();
    let reason = within(WAIT, async {
        loop {
            if let Some(ClientEvent::Lost { reason }) = events.next().await {
                break reason;
            }
        }
    })
    .await;
    assert!(
        matches!(
            &reason,
            LossReason::Status {
                code: tonic::Code::PermissionDenied,
                ..
            }
        ),
        "{reason:?}"
    );
    assert!(server.handle.registry().is_empty());
}

/// Tests that the browser listener serves TLS with the server's certificate,
/// offering HTTP/1.1 in ALPN (browsers upgrade to WebSocket over it), and a
/// session over `wss:` says Hello and gets its Welcome.
#[tokio::test]
async fn browsers_get_wss_with_the_same_certificate() {
    use futures_util::{SinkExt, StreamExt};
    use prost::Message as _;
    use tokio_rustls::rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, ServerName},
        RootCertStore,
    };
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    use tonic_heartbeat::protocol::pb;

    let pems = Pems::new("wss");
    let ca = TestCa::new("server ca");
    let web = free_port();
    let mut config = tls_config(&pems, &ca, None);
    config.web = Some(tonic_heartbeat::config::WebConfig::new(web));
    let server = TestServer::start(config).await;

    let mut roots = RootCertStore::empty();
    let ca_der = CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("the CA's certificate");
    roots.add(ca_der).expect("a root");
    let mut client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(web).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect(ServerName::try_from("127.0.0.1").expect("a name"), tcp)
        .await
        .expect("a TLS handshake with the server's certificate");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut request = format!("wss://127.0.0.1:{}/v1/heartbeat", web.port())
        .into_client_request()
        .expect("a URL");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "heartbeat.v1.proto".parse().expect("header"),
    );
    let (mut socket, _) = within(WAIT, tokio_tungstenite::client_async(request, tls))
        .await
        .expect("the upgrade over TLS");
    let hello = pb::HeartbeatRequest {
        frame: Some(pb::heartbeat_request::Frame::Hello(pb::Hello {
            client_id: "over-wss".into(),
            ..Default::default()
        })),
    };
    socket
        .send(Message::Binary(hello.encode_to_vec().into()))
        .await
        .expect("hello");
    match within(WAIT, socket.next()).await {
        Some(Ok(Message::Binary(bytes))) => {
            let response = pb::HeartbeatResponse::decode(bytes).expect("a frame");
            assert!(
                matches!(
                    response.frame,
                    Some(pb::heartbeat_response::Frame::Welcome(_))
                ),
                "{response:?}"
            );
        }
        other => panic!("expected a Welcome, got {other:?}"),
    }
    server.shutdown().await.expect("clean shutdown");
}
