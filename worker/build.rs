//! Links libtorch so that the binaries run without LD_LIBRARY_PATH: an rpath to the venv's
//! torch/lib, and libtorch_cuda kept although no symbol of it is referenced directly (rustc's
//! `--as-needed` would drop it, and then libtorch would report CUDA as absent on GPU nodes).
//! Also compiles the small C++ shim (`shim/`) against libtorch's headers.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=shim/precision.cpp");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys reports its libtorch directory (DEP_TCH_LIBTORCH_LIB)");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    let include = Path::new(&lib).join("../include");
    cc::Build::new()
        .cpp(true)
        .file("shim/precision.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("ladder_shim");
}
