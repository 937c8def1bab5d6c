//! NATS over TLS (`[nats] tls_ca`, `tls_cert`, `tls_key`) against a real nats-server that requires
//! TLS and verifies client certificates, with the test PKI in `testbed/fixtures/nats-tls`: the
//! orchestrator and a client work over it; a client that does not trust the server's CA, or
//! brings no certificate, or half a pair, or a missing file, is refused with a clear error.

use rhizos_broker::bus::ConnectError;
use rhizos_broker::server::{LaunchOptions, NatsServer, ServerTls};
use rhizos_broker::{Bus, Client, Settings};
use rhizos_core::Orchestrator;
use std::path::PathBuf;

fn pki(file: &str) -> PathBuf {
    rhizos_testbed::guests::workspace_root()
        .join("testbed/fixtures/nats-tls")
        .join(file)
}

fn settings(nats: &NatsServer) -> Settings {
    let mut settings = Settings::default();
    // The server's certificate names 127.0.0.1, which is what the URL says.
    settings.nats.url = nats.url();
    settings.nats.namespace = format!("tls{}", &rhizos_testbed::cluster::uuid_like()[..8]);
    settings.nats.tls_ca = Some(pki("ca.pem"));
    settings.nats.tls_cert = Some(pki("client.pem"));
    settings.nats.tls_key = Some(pki("client.key"));
    settings
}

#[tokio::test]
async fn the_network_runs_over_mutual_tls_and_refuses_clients_without_the_right_keys() {
    let nats = NatsServer::start_tls(
        LaunchOptions::default(),
        &ServerTls {
            cert: pki("server.pem"),
            key: pki("server.key"),
            client_ca: Some(pki("ca.pem")),
        },
    )
    .unwrap();
    let settings = settings(&nats);
    let data_dir = tempfile::tempdir().unwrap();
    let mut orchestrator_settings = settings.orchestrator.clone();
    orchestrator_settings.data_dir = data_dir.path().to_path_buf();

    // The orchestrator (event stream, ledger) and a client, both over mutual TLS.
    let orchestrator = Orchestrator::open(
        Bus::connect(&settings.nats).await.unwrap(),
        orchestrator_settings,
    )
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(orchestrator.run(async {
        let _ = stopped.await;
    }));
    let client = Client::new(Bus::connect(&settings.nats).await.unwrap());
    let mut answered = None;
    for _ in 0..200 {
        match client.account_create("tls-user").await {
            Ok(view) => {
                answered = Some(view);
                break;
            }
            Err(e) if e.remote().is_none() => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(answered.unwrap().balance_micros, 0);
    let view = client
        .account_deposit("tls-user", 1_250_000, Some("tls-1"))
        .await
        .unwrap();
    assert_eq!(view.balance_micros, 1_250_000);
    assert!(client.ledger_verify().await.unwrap().ok);

    // Refused: the server's CA not trusted (another CA; the system roots).
    let mut wrong_ca = settings.clone();
    wrong_ca.nats.tls_ca = Some(pki("other-ca.pem"));
    let error = Bus::connect(&wrong_ca.nats).await.unwrap_err();
    assert!(
        matches!(error, ConnectError::Connect { .. }),
        "wrong CA: {error}"
    );
    let mut system_roots = settings.clone();
    system_roots.nats.tls_ca = None;
    assert!(Bus::connect(&system_roots.nats).await.is_err());

    // Refused: no client certificate for a server that verifies clients.
    let mut no_cert = settings.clone();
    no_cert.nats.tls_cert = None;
    no_cert.nats.tls_key = None;
    assert!(Bus::connect(&no_cert.nats).await.is_err());

    // Refused before connecting, naming the setting: half a pair, a missing file.
    let mut half = settings.clone();
    half.nats.tls_key = None;
    let error = Bus::connect(&half.nats).await.unwrap_err();
    assert!(matches!(error, ConnectError::TlsPair), "{error}");
    let mut missing = settings.clone();
    missing.nats.tls_ca = Some(pki("nope.pem"));
    let error = Bus::connect(&missing.nats).await.unwrap_err().to_string();
    assert!(
        error.starts_with("[nats] tls_ca = ") && error.contains("nope.pem"),
        "{error}"
    );

    // A plain client cannot talk to a server that requires TLS.
    let mut plain = settings.clone();
    plain.nats.tls_ca = None;
    plain.nats.tls_cert = None;
    plain.nats.tls_key = None;
    assert!(Bus::connect(&plain.nats).await.is_err());

    // Nothing the refused clients tried changed the books.
    assert_eq!(
        client
            .account_balance("tls-user")
            .await
            .unwrap()
            .balance_micros,
        1_250_000
    );
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_client_that_asks_for_tls_refuses_a_server_without_it() {
    let nats = NatsServer::start(LaunchOptions::default()).unwrap();
    let mut settings = Settings::default();
    settings.nats.url = nats.url();
    settings.nats.tls_ca = Some(pki("ca.pem"));
    assert!(
        Bus::connect(&settings.nats).await.is_err(),
        "tls_ca set: a server that does not offer TLS must be refused"
    );
}
