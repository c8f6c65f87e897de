//! The Rust model runtime reproduces the outputs that PyTorch computed at
//! export time (deploy/models/export_stock_lstm.py), batched and one at a
//! time, directly and through the model thread.

use sluice_model::{Batch, Model, ModelConfig, ModelWorker};
use sluice_tests::{model_config, model_dir};

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
