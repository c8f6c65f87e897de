//! Kafka over TLS, and SASL settings reaching librdkafka. The tansu broker
//! here speaks plain TCP only, so a TLS-terminating proxy (rustls, with a
//! certificate made for the test) stands in front of it and the broker
//! advertises the proxy's address: every connection of every stage, not only
//! the first, is then TLS. The pipeline runs through it with the broker's
//! certificate verified against `ssl.ca.location`; a client that trusts
//! another CA is refused.

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use sluice_kafka::KafkaConfig;
use sluice_kafka::client::{Publisher, TopicReader};
use sluice_messages::prediction::PredictionRecord;
use sluice_stages::fetcher::SyntheticConfig;
use sluice_stages::generate::generate;
use sluice_testkit::{
    Broker, heavy_test_lock, sluice, sluice_bin, start_stages, tail, temp_dir, unique, write_config, write_events,
};

/// Accepts TLS on its port and forwards the decrypted bytes to the broker.
struct TlsProxy {
    handshakes: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

impl TlsProxy {
    /// Serves on `listener` (on a thread and runtime of its own, so that the
    /// test's blocking calls never starve it) until the process ends.
    fn start(listener: TcpListener, upstream: String, server: &rcgen::CertifiedKey<rcgen::KeyPair>) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(server.cert.der().to_vec())],
                PrivatePkcs8KeyDer::from(server.signing_key.serialize_der()).into(),
            )
            .expect("server certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let (ok, bad) = (handshakes.clone(), refused.clone());
        listener.set_nonblocking(true).expect("non-blocking listener");
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("proxy runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((client, _)) = listener.accept().await else { continue };
                    let (acceptor, upstream, ok, bad) = (acceptor.clone(), upstream.clone(), ok.clone(), bad.clone());
                    tokio::spawn(async move {
                        match acceptor.accept(client).await {
                            Ok(mut tls) => {
                                ok.fetch_add(1, Ordering::SeqCst);
                                if let Ok(mut broker) = tokio::net::TcpStream::connect(&upstream).await {
                                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                                }
                            }
                            Err(_) => {
                                bad.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    });
                }
            });
        });
        Self { handshakes, refused }
    }
}

/// Client settings for TLS to `localhost`, trusting the CA in `ca_file`.
fn tls_properties(ca_file: &Path) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("security.protocol".into(), "SSL".into()),
        ("ssl.ca.location".into(), ca_file.display().to_string()),
        // librdkafka's default since 2.0, written out: the certificate must name the host.
        ("ssl.endpoint.identification.algorithm".into(), "https".into()),
        // `localhost` also resolves to ::1, where nothing listens.
        ("broker.address.family".into(), "v4".into()),
    ])
}

fn toml_table(name: &str, properties: &BTreeMap<String, String>) -> String {
    let mut text = format!("[{name}]\n");
    for (k, v) in properties {
        text.push_str(&format!("{k:?} = {v:?}\n"));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the guard serialises whole tests; nothing else takes it")]
async fn the_pipeline_runs_over_tls_and_a_broker_certificate_from_another_ca_is_refused() {
    let _heavy = heavy_test_lock();
    let listener = TcpListener::bind("127.0.0.1:0").expect("proxy port");
    let advertised = format!("localhost:{}", listener.local_addr().expect("address").port());
    let broker = Broker::start_advertising(Some(&advertised));
    let server = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
    let proxy = TlsProxy::start(listener, broker.addr.clone(), &server);

    let dir = temp_dir("kafka-tls");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, server.cert.pem()).expect("CA file");
    let properties = tls_properties(&ca);
    let prefix = unique("tls");
    let extra = format!(
        "{}\n[inferrer]\nserve = [\"stock\"]\n\n[normalizer]\ntokenize_queries = false\n",
        toml_table("kafka.properties", &properties)
    );
    let config = write_config(&dir, &advertised, &prefix, 2, &extra);
    sluice(&config, &["topics", "create"]);

    let events = generate("tls", 200, 0, SyntheticConfig::default().universe);
    let stages = start_stages(&config, &dir);
    let secrets = properties.iter().map(|(k, v)| (k.clone(), v.as_str().into())).collect();
    let kafka = KafkaConfig { brokers: advertised.clone(), properties: secrets, ..KafkaConfig::default() };
    let predictions_topic = format!("{prefix}.predictions");
    let reader = TopicReader::new(&kafka, &unique("observer"), &[&predictions_topic]).expect("reader");
    let published = sluice(
        &config,
        &["produce", "--file", write_events(&dir, events.iter().map(|e| &e.json)).to_str().expect("utf-8")],
    );
    assert!(published.contains("published 200 events"), "{published}");

    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen.len() < events.len() && Instant::now() < deadline {
        let Some(record) = reader.next(Duration::from_millis(200)).await else { continue };
        let p: PredictionRecord = serde_json::from_slice(&record.expect("read").payload).expect("prediction JSON");
        seen.insert(p.event_id);
    }
    let logs: String = stages.iter().map(|s| format!("---- {}\n{}", s.stage, tail(&s.logs(), 20))).collect();
    assert_eq!(seen.len(), events.len(), "predictions over TLS\n{logs}");
    assert!(events.iter().all(|e| seen.contains(&e.event_id)), "predictions for other events");
    // Four stages, the topic creator, the producer and the reader: each
    // connected through the proxy at least once, and all were TLS.
    let handshakes = proxy.handshakes.load(Ordering::SeqCst);
    assert!(handshakes >= 7, "only {handshakes} TLS connections");
    assert_eq!(proxy.refused.load(Ordering::SeqCst), 0, "a handshake failed\n{logs}");

    // A client that trusts another CA does not talk to this broker.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
    let other_ca = dir.join("other-ca.pem");
    std::fs::write(&other_ca, other.cert.pem()).expect("CA file");
    let distrusting = dir.join("distrusting.toml");
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace(&ca.display().to_string(), &other_ca.display().to_string())
        .replace("[inferrer]", "[kafka.producer_properties]\n\"message.timeout.ms\" = \"5000\"\n\n[inferrer]");
    std::fs::write(&distrusting, text).expect("config");
    let output = Command::new(sluice_bin())
        .arg("--config")
        .arg(&distrusting)
        .args(["produce", "--synthetic", "1"])
        .env("RUST_LOG", "info")
        .output()
        .expect("run sluice");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "published to a broker whose certificate it cannot verify\n{stderr}");
    assert!(stderr.contains("certificate verify failed"), "the reason is not given:\n{stderr}");
    assert!(proxy.refused.load(Ordering::SeqCst) >= 1, "the proxy saw no refused handshake");
}

/// SASL settings pass through the configuration to librdkafka, which checks
/// them when a client is made: SCRAM (which needs librdkafka's OpenSSL) and
/// PLAIN over TLS are accepted, an unknown mechanism is refused by name.
/// (No SASL-enabled broker runs here: the exchange itself is not exercised.)
#[test]
fn sasl_settings_reach_librdkafka() {
    let sasl = |mechanism: &str| {
        let properties = BTreeMap::from([
            ("security.protocol".to_string(), "SASL_SSL".to_string()),
            ("sasl.mechanism".to_string(), mechanism.to_string()),
            ("sasl.username".to_string(), "sluice".to_string()),
            ("sasl.password".to_string(), "not-a-real-password".to_string()),
        ]);
        let properties = properties.into_iter().map(|(k, v)| (k, v.into())).collect();
        let kafka = KafkaConfig { brokers: "127.0.0.1:1".into(), properties, ..KafkaConfig::default() };
        Publisher::new(&kafka, "sasl-check").map(drop).map_err(|e| e.to_string())
    };
    for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] {
        assert_eq!(sasl(mechanism), Ok(()), "{mechanism}");
    }
    let refused = sasl("SCRAM-SHA-1024").expect_err("an unknown mechanism");
    // librdkafka's own refusal, naming the value it was given.
    assert!(refused.contains("Unsupported hash function: SCRAM-SHA-1024"), "{refused}");
    assert!(!refused.contains("not-a-real-password"), "{refused}");
}
