//! Mixup and CutMix against an oracle written from the official EfficientNetV2 code's
//! definitions (tests/official_mix.py): the same raw draws give the same partners, weights,
//! boxes and label weights, and the Beta draws pass a Kolmogorov-Smirnov test.

use ladder_core::rng::Stream;
use ladder_data::mix::{self, Row};
use serde_json::{Value, json};
use std::path::Path;

fn row_json(row: &Row) -> Value {
    match row {
        Row::Kept => json!({ "kind": "kept" }),
        Row::Mixup { partner, weight } => {
            json!({ "kind": "mixup", "partner": partner, "weight": weight })
        }
        Row::Cutmix {
            partner,
            cut,
            label_weight,
        } => json!({
            "kind": "cutmix", "partner": partner, "label_weight": label_weight,
            "cut": [cut.top, cut.bottom, cut.left, cut.right],
        }),
    }
}

#[test]
fn mixup_and_cutmix_match_the_official_definitions() {
    let mut plans = Vec::new();
    // Both on, each alone, odd and even rows, small and large images, strong and weak alphas.
    for (n, (mixup_alpha, cutmix_alpha, rows, size)) in [
        (0.5, 0.5, 8, 64),
        (0.2, 0.0, 7, 128),
        (0.0, 1.0, 5, 96),
        (0.4, 0.4, 16, 384),
        (1.0, 0.3, 3, 32),
    ]
    .into_iter()
    .enumerate()
    {
        for step in 0..20 {
            let plan = mix::draw(5, 1, step, n as u32, mixup_alpha, cutmix_alpha, rows, size)
                .expect("mixing on");
            plans.push(json!({
                "rows": rows, "size": size,
                "mixup_alpha": mixup_alpha, "cutmix_alpha": cutmix_alpha,
                "beta_draws": plan.beta_draws, "centers": plan.centers,
                "ladder": plan.rows.iter().map(row_json).collect::<Vec<_>>(),
            }));
        }
    }
    let beta_samples: serde_json::Map<String, Value> = [0.2, 0.5, 1.0]
        .into_iter()
        .map(|alpha: f64| {
            let mut rng = Stream::new(11, &[alpha.to_bits()]);
            let draws: Vec<f64> = (0..10_000).map(|_| mix::beta(alpha, &mut rng)).collect();
            (alpha.to_string(), json!(draws))
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plans.json");
    std::fs::write(
        &file,
        json!({ "plans": plans, "beta_samples": beta_samples }).to_string(),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/official_mix.py");
    eprint!(
        "{}",
        ladder_testkit::run_python(&script, &[file.as_os_str()])
    );
}
