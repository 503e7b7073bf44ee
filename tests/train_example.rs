//! The training example converges: the loss falls and the moving
//! statistics approach the data's.

mod common;

#[path = "../examples/train.rs"]
#[allow(dead_code)]
mod train;

#[test]
fn the_training_example_converges() {
    let run = train::train(&common::gpu(), 300).unwrap();
    let first: f32 = run.losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = run.losses[run.losses.len() - 10..].iter().sum::<f32>() / 10.0;
    // what remains is the noise of 256-sample batch statistics
    assert!(last < first / 20.0 && last < 0.25, "loss {first} -> {last}");
    let means = [5.0f32, -3.0, 10.0, 0.5];
    let stds = [2.0f32, 0.5, 4.0, 1.0];
    for c in 0..4 {
        assert!(
            (run.moving_mean[c] - means[c]).abs() < 0.25 * stds[c],
            "mean {c}: {:?}",
            run.moving_mean
        );
        let var = stds[c] * stds[c];
        assert!(
            (run.moving_variance[c] - var).abs() < 0.3 * var,
            "var {c}: {:?}",
            run.moving_variance
        );
    }
}
