//! `sluice bench backlog`: a backlog drains with bounded memory. N events are
//! published before any stage runs; then the four stages start (separate
//! processes, tansu broker) and work it off, while each process's resident
//! memory is sampled. Reports the drain time and every process's peak.
//!
//! Most events are queries (about 1 KB through all topics together); every
//! `stock_every`-th is a stock event (about 25 KB: two 12.6 KB windows). tansu
//! keeps every record in RAM, so the mix decides whether a million events fit
//! on the machine at all; the stages' memory must not depend on it.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_app::config::SluiceConfig;
use sluice_app::launch::StageKind;
use sluice_kafka::client::Publisher;
use sluice_stages::generate::{generate, generate_queries};

use crate::cluster::{LocalCluster, cpu_seconds, rss_bytes};
use crate::write_section;

/// Memory of one process over the drain.
#[derive(Default, Clone, Copy)]
struct Memory {
    /// Resident bytes when 10%, 50% and 90% of the backlog had drained.
    at: [u64; 3],
    peak: u64,
}

pub async fn backlog(mut config: SluiceConfig, events: usize, stock_every: usize, out: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(events > 0, "--events must be at least 1");
    let run = format!("backlog{}", std::process::id());
    let mut cluster = LocalCluster::broker(&mut config, &run).await?;

    // The backlog, published before any stage runs.
    let stocks = if stock_every == 0 { 0 } else { events.div_ceil(stock_every) };
    let mut stock = generate(&run, stocks, 0, config.fetcher.synthetic.universe).into_iter();
    let mut queries = generate_queries(&run, events - stocks).into_iter();
    let mut publisher = Publisher::new(&config.kafka, "bench-backlog")?;
    let bar = sluice_app::produce::progress(events as u64, "publishing the backlog");
    let publishing = Instant::now();
    for i in 0..events {
        let is_stock = stock_every != 0 && i % stock_every == 0;
        let event = if is_stock { stock.next() } else { queries.next() };
        let event = event.ok_or_else(|| anyhow::anyhow!("ran out of generated events"))?;
        publisher.send(&config.topics.requests, Some(event.event_id.as_bytes()), &event.json).await?;
        bar.inc(1);
    }
    publisher.finish().await?;
    bar.finish_and_clear();
    let published = publishing.elapsed().as_secs_f64();
    let broker_after_publish = rss_bytes(cluster.broker.pid()).0;

    // The stages, started on the backlog. Only the output topic as a sink: the
    // question is the stages' memory, not PostgreSQL's speed.
    let draining = Instant::now();
    let kinds = StageKind::ALL;
    cluster.start_stages(&config, &kinds, &[]).await?;
    let ready = draining.elapsed().as_secs_f64();
    let names: Vec<String> = cluster.processes().into_iter().map(|(n, _)| n).collect();
    let mut memory = vec![Memory::default(); names.len()];
    let mut milestone = 0;
    let mut first_at = None;
    let deadline = Duration::from_secs(3600);
    let bar = sluice_app::produce::progress(events as u64, "draining");
    loop {
        let done = cluster.metric(StageKind::Writer, "sluice_stage_events_acknowledged_total") as usize;
        bar.set_position(done as u64);
        if first_at.is_none() && done > 0 {
            first_at = Some(draining.elapsed().as_secs_f64());
        }
        let marks = [events / 10, events / 2, events * 9 / 10];
        while milestone < marks.len() && done >= marks[milestone] {
            for ((_, pid), m) in cluster.processes().into_iter().zip(&mut memory) {
                m.at[milestone] = rss_bytes(pid).0;
            }
            milestone += 1;
        }
        if done >= events {
            break;
        }
        cluster.check_running("draining")?;
        anyhow::ensure!(draining.elapsed() < deadline, "only {done} of {events} drained after {deadline:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bar.finish_and_clear();
    let drained = draining.elapsed().as_secs_f64();
    for ((_, pid), m) in cluster.processes().into_iter().zip(&mut memory) {
        m.peak = rss_bytes(pid).1;
    }
    let dead = kinds.iter().map(|k| cluster.metric(*k, "sluice_stage_dead_letters_total")).sum::<f64>().abs();
    let cpu: Vec<f64> = cluster.processes().into_iter().map(|(_, pid)| cpu_seconds(pid)).collect();
    drop(cluster);

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut table = String::from(
        "| process | RSS at 10% drained (MiB) | at 50% | at 90% | peak RSS (MiB) | CPU (s) |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for ((name, m), cpu) in names.iter().zip(&memory).zip(&cpu) {
        let name = if name == "tansu" { "tansu broker (holds every record in RAM)" } else { name };
        table.push_str(&format!(
            "| {name} | {:.0} | {:.0} | {:.0} | **{:.0}** | {cpu:.1} |\n",
            mib(m.at[0]),
            mib(m.at[1]),
            mib(m.at[2]),
            mib(m.peak)
        ));
    }
    let first = first_at.unwrap_or(drained);
    let section = format!(
        "## A backlog of {events} events\n\n\
         Command: `cargo run --release --bin sluice -- bench backlog --events {events} --stock-every {stock_every}`\n\
         (measured on {when}: this 2-core machine, CPU only; tansu broker and the four stages as\n\
         separate processes, output topic as the only sink). {stocks} stock events (one in\n\
         {stock_every}) and {queries} query events were published before any stage ran\n\
         ({published:.0} s; the broker then held {broker:.0} MiB). The stages were started on the\n\
         backlog and worked it off; each process's resident memory (`VmRSS`, and the peak `VmHWM`,\n\
         from `/proc`) was read as 10%, 50% and 90% of the events left the writer.\n\n\
         | measure | value |\n|---|---:|\n\
         | start to ready (model loads, group joins) | {ready:.1} s |\n\
         | start to the first event out | {first:.1} s |\n\
         | start to the last event out | **{drained:.0} s** |\n\
         | drain rate after the first event | {rate:.0} events/s |\n\
         | dead letters | {dead:.0} |\n\n{table}\n\
         The stages' memory is bounded by configuration, not by the backlog: each consumer\n\
         prefetches at most `queued.max.messages.kbytes` (64 MiB), the runtime queues at most\n\
         `runtime.queue_capacity` inputs, the producer holds at most its `queue.buffering.max.*`,\n\
         and the caches their `max_entries`/`max_bytes`.\n",
        queries = events - stocks,
        broker = mib(broker_after_publish),
        rate = events as f64 / (drained - first).max(1e-9),
        when = chrono::Utc::now().format("%Y-%m-%d"),
    );
    write_section(out, "backlog", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
}
