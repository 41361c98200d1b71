fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=ladder/v1/ladder.proto");
    let descriptors = protox::compile(["ladder/v1/ladder.proto"], ["."])?;
    // The coordinator saves these messages as they are (JSON in its store): one definition of
    // a job's progress and of a checkpoint's reference, not a record mirroring the wire.
    let saved = "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]";
    // Jobs and workers are shown everywhere as these messages: the status page's JSON is
    // their serde form, so the page, the CLI and gRPC clients read one view.
    let shown = "#[derive(serde::Serialize)]";
    let mut config = tonic_prost_build::configure()
        .btree_map(".")
        .type_attribute("ladder.v1.Progress", saved)
        .type_attribute("ladder.v1.CheckpointRef", saved)
        .type_attribute("ladder.v1.Job", shown)
        .type_attribute("ladder.v1.EpochTally", shown)
        .type_attribute("ladder.v1.WorkerInfo", shown)
        .type_attribute("ladder.v1.ListJobsResponse", shown)
        .type_attribute("ladder.v1.ListWorkersResponse", shown)
        .field_attribute(
            "ladder.v1.Job.state",
            "#[serde(serialize_with = \"crate::serialize_job_state\")]",
        )
        // Past 2^53 a JSON number loses digits in a browser: the digest is shown as hex.
        .field_attribute(
            "ladder.v1.EpochTally.digest",
            "#[serde(serialize_with = \"crate::serialize_hex\")]",
        )
        // A job's state is this enum everywhere (records, answers, the command line), saved by
        // its name: "queued", "running", ...
        .type_attribute(
            "ladder.v1.JobState",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"snake_case\")]",
        );
    // Numbers a worker reports may be NaN or infinite: saved so that they read back (see
    // src/saved_f32.rs). Every float field of a saved message is listed here.
    for field in [
        "loss",
        "images_per_second",
        "eta_seconds",
        "eval_top1",
        "eval_top5",
        "learning_rate",
    ] {
        config = config.field_attribute(
            format!("ladder.v1.Progress.{field}"),
            "#[serde(with = \"crate::saved_f32\")]",
        );
    }
    config.compile_fds(descriptors)?;
    Ok(())
}
