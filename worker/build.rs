//! Links libtorch (see `train/link_libtorch.rs`): the worker's binary and tests load it.
include!("../train/link_libtorch.rs");

fn main() {
    println!("cargo:rerun-if-changed=../train/link_libtorch.rs");
    link_libtorch();
}
