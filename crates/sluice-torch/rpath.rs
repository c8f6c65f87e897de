//! Build script shared by every package that links libtorch (`build = ...`).
//!
//! libtorch lives in the Python venv, outside the system library path. Embedding
//! its directory as an rpath lets `cargo run` and the test binaries start with no
//! `LD_LIBRARY_PATH`. torch-sys exports the directory as `DEP_TCH_LIBTORCH_LIB`
//! to packages that depend on it directly, and a link argument applies only to
//! the package that prints it, hence one shared script named by each package.
#![allow(clippy::print_stdout)] // cargo reads a build script's stdout

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
