//! Links libtorch (see `link_libtorch.rs`) and compiles the small C++ shim (`shim/`) against
//! its headers.
include!("link_libtorch.rs");

fn main() {
    println!("cargo:rerun-if-changed=shim/precision.cpp");
    println!("cargo:rerun-if-changed=link_libtorch.rs");
    let include = link_libtorch().join("../include");
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
