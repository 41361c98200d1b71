fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=ladder/v1/ladder.proto");
    let descriptors = protox::compile(["ladder/v1/ladder.proto"], ["."])?;
    // The coordinator saves these messages as they are (JSON in its store): one definition of
    // a job's progress and of a checkpoint's reference, not a record mirroring the wire.
    let saved = "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]";
    tonic_prost_build::configure()
        .type_attribute("ladder.v1.Progress", saved)
        .type_attribute("ladder.v1.CheckpointRef", saved)
        .compile_fds(descriptors)?;
    Ok(())
}
