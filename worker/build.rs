//! Links libtorch so that the binaries run without LD_LIBRARY_PATH: an rpath to the venv's
//! torch/lib, and libtorch_cuda kept although no symbol of it is referenced directly (rustc's
//! `--as-needed` would drop it, and then libtorch would report CUDA as absent on GPU nodes).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
