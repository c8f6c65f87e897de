//! `sluice bench query`: the query model's throughput on this machine, in
//! process (no broker), over the exporter's held-out phrases in their own
//! order: by batch size, padding each call to its longest phrase against
//! padding to the model's maximum length; and the query inferrer stage itself
//! by token budget (it sorts by length and caps each call's padded tokens).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use sluice_app::config::SluiceConfig;
use sluice_control::Settings;
use sluice_core::{Incoming, Stage};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Payload, QueryTokens};
use sluice_model::{Batch, QueryTokenizer};
use sluice_stages::{InferrerStats, QueryInferrer};
use sluice_torch::{Model, ModelWorker, TorchLoader};
use tokio::sync::watch;

use crate::write_section;

/// Best of `runs` timings of `f`, in seconds (the first call warms up, untimed).
fn best<T>(runs: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let started = Instant::now();
        f()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(best)
}

pub async fn query(config: SluiceConfig, out: &Path) -> anyhow::Result<()> {
    let model_config = config.inferrer.query.model.clone();
    let dir = model_config.version_dir(&model_config.version);
    let model = Model::load(&model_config)?;
    let metadata = model.metadata().clone();
    let tokenizer = QueryTokenizer::load(&dir, &metadata)?;
    let spec = metadata.tokenizer.clone().ok_or_else(|| anyhow::anyhow!("not a query model"))?;
    let phrases = metadata.load_phrases(&dir)?;
    anyhow::ensure!(!phrases.is_empty(), "the query model ships no reference phrases");
    let ids: Vec<Vec<u32>> = phrases.iter().map(|p| tokenizer.encode(&p.text)).collect::<Result<_, _>>()?;
    let n = ids.len();
    let mean_len = ids.iter().map(Vec::len).sum::<usize>() as f64 / n as f64;
    let longest = ids.iter().map(Vec::len).max().unwrap_or(0);

    // The model alone, by batch size: the phrases in order, cut every `batch`.
    let run = |batch: usize, pad_to: usize| -> anyhow::Result<()> {
        for chunk in ids.chunks(batch) {
            let sequences: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            model.forward(&Batch::tokens(&sequences, pad_to, spec.pad_id, Vec::new(), Vec::new()), chunk.len())?;
        }
        Ok(())
    };
    let mut by_batch = String::from(
        "| batch size | padded to the longest: queries/s | padded to max length: queries/s | speed-up |\n|---:|---:|---:|---:|\n",
    );
    let mut one = 0.0;
    for batch in [1, 2, 4, 8, 16, 32, 64, 128] {
        let longest_s = best(2, || run(batch, 0))?;
        let max_s = best(1, || run(batch, spec.max_length))?;
        if batch == 1 {
            one = n as f64 / longest_s;
        }
        by_batch.push_str(&format!(
            "| {batch} | {:.0} | {:.0} | {:.1}× |\n",
            n as f64 / longest_s,
            n as f64 / max_s,
            max_s / longest_s
        ));
        tracing::info!(batch, "measured");
    }
    drop(model);

    // The stage, by token budget: all phrases as one cut batch, cache off.
    let incoming: Vec<Incoming> = phrases
        .iter()
        .zip(&ids)
        .enumerate()
        .map(|(i, (p, ids))| {
            let envelope = Envelope::new(
                &format!("q{i}"),
                Payload::Tokens(QueryTokens { text: p.text.clone(), ids: ids.clone() }),
            );
            Incoming::new("bench", 0, i as i64, codec::encode(&envelope))
        })
        .collect();
    let base = Settings { cache_enabled: false, max_batch_size: 128, ..config.query_base_settings() };
    let (settings, receiver) = watch::channel(base.clone());
    let worker = ModelWorker::start(model_config.clone()).await?;
    let mut stage = QueryInferrer::new(
        TorchLoader,
        worker,
        model_config,
        receiver,
        None,
        "bench",
        Arc::new(InferrerStats::default()),
    )?;
    let mut by_budget = String::from("| max_batch_tokens | queries/s | vs. batch 1 |\n|---:|---:|---:|\n");
    for budget in [256, 512, 1024, 2048, 4096, 8192, 16384] {
        settings.send_modify(|s| s.max_batch_tokens = budget);
        stage.process(&incoming).await.map_err(|e| anyhow::anyhow!(e.message))?;
        let mut seconds = f64::INFINITY;
        for _ in 0..2 {
            let started = Instant::now();
            stage.process(&incoming).await.map_err(|e| anyhow::anyhow!(e.message))?;
            seconds = seconds.min(started.elapsed().as_secs_f64());
        }
        by_budget.push_str(&format!("| {budget} | {:.0} | {:.1}× |\n", n as f64 / seconds, n as f64 / seconds / one));
        tracing::info!(budget, "measured");
    }

    let section = format!(
        "## Query model: queries per second by batch size and token budget (in process)\n\n\
         Command: `cargo run --release --bin sluice -- bench query` (measured on {when}, this 2-core\n\
         machine, CPU, libtorch intra-op threads: {threads}). The model is all-MiniLM-L6-v2 with the\n\
         intent head ({labels} labels), on the {n} held-out phrases of its export (mean {mean_len:.1}\n\
         tokens, longest {longest}, max length {max}). Best of two timed passes after one untimed.\n\n\
         The model alone, phrases in arrival order, cut every *batch size*; each call padded to its\n\
         own longest phrase, or to the maximum length:\n\n{by_batch}\n\
         The query inferrer stage (`process` on all {n} phrases as one cut batch, cache off, at most\n\
         128 rows a call): it sorts by length and cuts calls at `max_batch_tokens` padded tokens:\n\n{by_budget}",
        when = chrono::Utc::now().format("%Y-%m-%d"),
        threads = config.inferrer.query.model.threads(),
        labels = metadata.labels.len(),
        max = spec.max_length,
    );
    write_section(out, "query", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
}
