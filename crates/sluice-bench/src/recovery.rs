//! `sluice bench recovery`: how long answers stop when the inferrer is killed
//! (`kill -9`) mid-stream and restarted at once, with dynamic group
//! membership and with static membership (`kafka.instance_id`). A steady
//! stream of stock events runs through the four stages (separate processes,
//! tansu broker); the time from each kill to the first answer the restarted
//! inferrer computed is the recovery time.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_app::config::SluiceConfig;
use sluice_app::launch::StageKind;
use sluice_kafka::client::{Publisher, TopicReader};
use sluice_messages::prediction::PredictionRecord;
use sluice_stages::generate::generate;

use crate::cluster::LocalCluster;
use crate::write_section;

/// Events per second of the steady stream.
const RATE: usize = 500;
/// The longest a restarted inferrer may take to answer before the run fails.
const GIVE_UP: Duration = Duration::from_secs(90);

/// One mode's recovery times, in seconds.
struct Mode {
    name: &'static str,
    env: Vec<(String, String)>,
    seconds: Vec<f64>,
}

pub async fn recovery(config: SluiceConfig, kills: usize, out: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(kills > 0, "--kills must be at least 1");
    let mut modes = [
        Mode { name: "dynamic (`kafka.instance_id` empty)", env: Vec::new(), seconds: Vec::new() },
        Mode {
            name: "static (`kafka.instance_id` set)",
            env: vec![("SLUICE_KAFKA__INSTANCE_ID".into(), "bench-recovery".into())],
            seconds: Vec::new(),
        },
    ];
    for (m, mode) in modes.iter_mut().enumerate() {
        let mut config = config.clone();
        let run = format!("recovery{}x{m}", std::process::id());
        let mut cluster = LocalCluster::broker(&mut config, &run).await?;
        let others = [StageKind::Fetcher, StageKind::Normalizer, StageKind::Writer];
        cluster.start_stages(&config, &others, &[]).await?;
        cluster.start_stages(&config, &[StageKind::Inferrer], &mode.env).await?;

        // When each answer was computed (the inferrer's clock, ms).
        let answers: Arc<Mutex<Vec<i64>>> = Arc::default();
        let reader = TopicReader::new(&config.kafka, &format!("{run}-observer"), &[&config.topics.predictions])?;
        let stop = Arc::new(AtomicBool::new(false));
        let reading = {
            let (answers, stop) = (answers.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(Ok(record)) = reader.next(Duration::from_millis(100)).await
                        && let Ok(p) = serde_json::from_slice::<PredictionRecord>(&record.payload)
                    {
                        answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(p.inferred_at_ms);
                    }
                }
            })
        };
        let publishing = {
            let (kafka, topic, stop) = (config.kafka.clone(), config.topics.requests.clone(), stop.clone());
            let (universe, run) = (config.fetcher.synthetic.universe, run.clone());
            tokio::spawn(async move {
                let mut publisher = Publisher::new(&kafka, "bench-recovery")?;
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    for event in generate(&format!("{run}-{n}"), RATE / 10, 0, universe) {
                        publisher.send(&topic, Some(event.event_id.as_bytes()), &event.json).await?;
                    }
                    n += 1;
                }
                publisher.finish().await.map(|_| ())
            })
        };
        let answered_after = |at: i64| {
            answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().copied().filter(|t| *t > at).min()
        };
        // Flowing before the first kill.
        let warm = sluice_messages::now_ms();
        while answered_after(warm).is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for _ in 0..kills {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let killed_at = sluice_messages::now_ms();
            cluster.kill_and_restart(&config, StageKind::Inferrer, &mode.env)?;
            let first = loop {
                if let Some(first) = answered_after(killed_at) {
                    break first;
                }
                anyhow::ensure!(
                    sluice_messages::now_ms() - killed_at < GIVE_UP.as_millis() as i64,
                    "no answer {GIVE_UP:?} after a kill ({})",
                    mode.name
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            mode.seconds.push((first - killed_at) as f64 / 1000.0);
            writeln!(
                std::io::stdout(),
                "{}: answering again {:.2} s after the kill",
                mode.name,
                mode.seconds.last().copied().unwrap_or_default()
            )?;
        }
        stop.store(true, Ordering::Relaxed);
        publishing.await??;
        reading.await?;
        drop(cluster);
    }

    let mut table = String::from("| membership | kills | median (s) | min | max |\n|---|---:|---:|---:|---:|\n");
    for mode in &modes {
        let mut sorted = mode.seconds.clone();
        sorted.sort_by(f64::total_cmp);
        table.push_str(&format!(
            "| {} | {} | **{:.1}** | {:.1} | {:.1} |\n",
            mode.name,
            sorted.len(),
            sorted[sorted.len() / 2],
            sorted[0],
            sorted[sorted.len() - 1]
        ));
    }
    let section = format!(
        "## Recovery after the inferrer is killed\n\n\
         Command: `cargo run --release --bin sluice -- bench recovery --kills {kills}`\n\
         (measured on {when}: this 2-core machine, CPU only; tansu broker and the four stages as\n\
         separate processes). {RATE} stock events a second flow through the pipeline; the\n\
         inferrer (serving both models) is killed with `kill -9` every few seconds and\n\
         restarted at once. Recovery is the time from the kill to the first answer the\n\
         restarted inferrer computed (its `inferred_at_ms`).\n\n{table}\n\
         The restarted process loads and warms up its models in a fraction of a second\n\
         (stock LSTM about 0.1 s, query MiniLM about 0.5 s, in its log); the rest is the\n\
         group. With dynamic membership the dead member keeps its partitions until its\n\
         session (`kafka.session_timeout_ms`, 6 s) expires, then the group rebalances; a\n\
         static member restarted under the same name takes its place at once on Apache\n\
         Kafka (KIP-345), while tansu still makes the join wait (docs/operations.md,\n\
         \"Recovery after a crash\").\n",
        when = chrono::Utc::now().format("%Y-%m-%d"),
    );
    write_section(out, "recovery", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
}
