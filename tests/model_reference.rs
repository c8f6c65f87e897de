//! The Rust model runtime reproduces the outputs that PyTorch computed at
//! export time (deploy/models/export_stock_lstm.py), batched and one at a
//! time, directly and through the model thread.

use sluice_model::{Batch, ModelConfig, ModelKind, ModelRunner};
use sluice_testkit::{model_config, model_dir};
use sluice_torch::{Model, ModelWorker};

const TOLERANCE: f32 = 1e-5;

fn config() -> ModelConfig {
    model_config("1")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn reproduces_the_python_reference_outputs() {
    let model = Model::load(&config()).expect("load the fixture model (run `make setup`)");
    let metadata = model.metadata().clone();
    let reference =
        metadata.load_reference(&model_dir().join("1")).expect("read reference").expect("the fixture ships one");
    let count = metadata.reference.as_ref().expect("reference").count;
    assert!(count >= 8, "too few reference samples to mean anything: {count}");

    let batched = model.forward(&Batch::Windows(reference.inputs.clone()), count).expect("forward");
    let diff = max_abs_diff(&batched, &reference.outputs);
    assert!(diff <= TOLERANCE, "batched: max abs difference {diff} > {TOLERANCE}");

    let row = metadata.sample_len();
    let width = metadata.outputs.len();
    for i in 0..count {
        let one =
            model.forward(&Batch::Windows(reference.inputs[i * row..(i + 1) * row].to_vec()), 1).expect("forward one");
        let diff = max_abs_diff(&one, &reference.outputs[i * width..(i + 1) * width]);
        assert!(diff <= TOLERANCE, "sample {i} alone: max abs difference {diff} > {TOLERANCE}");
    }
    // The outputs mean what the metadata says: a return in (-0.05, 0.05), a confidence in (0, 1).
    let (r, c) =
        (metadata.output_index("predicted_return").expect("r"), metadata.output_index("confidence").expect("c"));
    for out in batched.chunks(width) {
        assert!(out[r].abs() < 0.05 && out[c] > 0.0 && out[c] < 1.0, "{out:?}");
    }
}

#[tokio::test]
async fn the_model_thread_gives_the_same_answers() {
    let worker = ModelWorker::start(config()).await.expect("start the model thread");
    assert_eq!(worker.device(), "cpu");
    let metadata = worker.metadata().clone();
    let reference = metadata.load_reference(&model_dir().join("1")).expect("read").expect("reference");
    let count = metadata.reference.as_ref().expect("reference").count;
    let inference = worker.infer(Batch::Windows(reference.inputs.clone()), count).await.expect("infer");
    let diff = max_abs_diff(&inference.outputs, &reference.outputs);
    assert!(diff <= TOLERANCE, "max abs difference {diff} > {TOLERANCE}");
    // A wrong-sized input is an error, not a crash of the thread.
    let wrong = worker.infer(Batch::Windows(vec![0.0; 7]), 1).await.expect_err("wrong size");
    assert!(wrong.to_string().contains("is not 1 x"), "{wrong}");
    assert!(worker.infer(Batch::Windows(reference.inputs[..metadata.sample_len()].to_vec()), 1).await.is_ok());
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let config = ModelConfig { dir: "/nonexistent/model".into(), ..config() };
    let e = Model::load(&config).expect_err("missing");
    assert!(e.to_string().contains("/nonexistent/model/1/metadata.json"), "{e}");
}

/// The starting batch size: the configured one, the device's default when left
/// at 0, or tuned on the device to a p99 latency target.
#[test]
fn the_batch_size_is_chosen_by_device_or_tuned_to_a_latency_target() {
    use sluice_torch::choose_batch_size;
    let configured = choose_batch_size(&config(), 48, ModelKind::Stock).expect("choose");
    assert_eq!((configured.batch_size, configured.by), (48, "configured"));
    let by_device = choose_batch_size(&config(), 0, ModelKind::Stock).expect("choose");
    assert_eq!((by_device.batch_size, by_device.by, by_device.device.as_str()), (64, "device", "cpu"));
    let query = choose_batch_size(&sluice_testkit::query_model_config("1"), 0, ModelKind::Query).expect("choose");
    assert_eq!(query.batch_size, 32);

    // A target no call misses: the ceiling, every power of two up to it measured.
    let generous = ModelConfig { autotune_p99_ms: 60_000, ..config() };
    let tuned = choose_batch_size(&generous, 16, ModelKind::Stock).expect("tune");
    assert_eq!((tuned.batch_size, tuned.by), (16, "autotune"));
    assert_eq!(tuned.measured.iter().map(|(rows, _)| *rows).collect::<Vec<_>>(), vec![1, 2, 4, 8, 16]);

    // A real target: the choice is the largest measured size within it, and
    // the search stopped at the first size that missed (or at the ceiling).
    let target = std::time::Duration::from_millis(2);
    let tuned =
        choose_batch_size(&ModelConfig { autotune_p99_ms: 2, ..config() }, 512, ModelKind::Stock).expect("tune");
    let within: Vec<usize> = tuned.measured.iter().filter(|(_, p99)| *p99 <= target).map(|(rows, _)| *rows).collect();
    assert_eq!(tuned.batch_size, within.last().copied().unwrap_or(1), "{:?}", tuned.measured);
    let (last, last_p99) = *tuned.measured.last().expect("measured");
    assert!(last == 512 || last_p99 > target, "stopped early at {last}: {:?}", tuned.measured);
}

/// bfloat16 (weights and inputs) runs on the CPU and stays close to the
/// float32 reference; fp16 autocast needs CUDA and is refused on the CPU with
/// the setting named.
#[test]
fn bf16_runs_on_the_cpu_and_fp16_is_refused_there() {
    use sluice_model::Precision;
    let bf16 = Model::load(&ModelConfig { precision: Precision::Bf16, ..config() }).expect("load in bf16");
    let metadata = bf16.metadata().clone();
    let reference = metadata.load_reference(&model_dir().join("1")).expect("read reference").expect("reference");
    let count = metadata.reference.as_ref().expect("reference").count;
    let out = bf16.forward(&Batch::Windows(reference.inputs.clone()), count).expect("forward in bf16");
    let diff = max_abs_diff(&out, &reference.outputs);
    // bfloat16 keeps about 3 significant digits: close, but not float32-exact.
    assert!(diff > 0.0 && diff < 0.05, "bf16 against fp32: max abs difference {diff}");

    // Windows that travelled in bf16 (normalizer.window_precision) give the
    // bf16 model the very inputs it makes of float32 ones: the same answers,
    // bit for bit.
    let mut rounded = reference.inputs.clone();
    sluice_messages::envelope::WindowPrecision::Bf16.round(&mut rounded);
    assert_ne!(rounded, reference.inputs, "the reference inputs are not all bf16 values already");
    let from_bf16 = bf16.forward(&Batch::Windows(rounded), count).expect("forward bf16 windows");
    assert_eq!(from_bf16, out, "bf16 windows against float32 windows, both in a bf16 model");

    let refused = Model::load(&ModelConfig { precision: Precision::Fp16, ..config() }).expect_err("fp16 on the CPU");
    assert!(refused.to_string().contains("fp16"), "{refused}");
}
