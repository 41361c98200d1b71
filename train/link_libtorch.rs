// Shared by the build scripts of the crates whose binaries, tests and examples load libtorch
// (`include!`d: a build script has no crate to import from).

/// Links libtorch so that the binaries run without LD_LIBRARY_PATH: an rpath to the venv's
/// torch/lib, and libtorch_cuda kept although no symbol of it is referenced directly (rustc's
/// `--as-needed` would drop it, and then libtorch would report CUDA as absent on GPU nodes).
/// Returns libtorch's directory.
fn link_libtorch() -> std::path::PathBuf {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys reports its libtorch directory (DEP_TCH_LIBTORCH_LIB)");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let lib = std::path::PathBuf::from(lib);
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    lib
}
