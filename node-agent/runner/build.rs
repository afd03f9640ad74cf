//! Link libtorch so that CUDA really works (tch-rs #980): by default the final binary gets
//! no rpath and, with --as-needed, drops libtorch_cuda.so because no symbol of it is
//! referenced directly; torch then reports no CUDA even on a GPU machine. Link
//! libtorch_cuda (when libtorch has it) and libtorch with --no-as-needed, and set rpaths
//! to libtorch's directory (where it was built against) and to $ORIGIN/../lib (a packaged
//! layout), so the runner starts with no LD_LIBRARY_PATH.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .ok()
        .or_else(|| std::env::var("LIBTORCH").ok().map(|t| format!("{t}/lib")));
    let Some(lib) = lib else {
        println!(
            "cargo:warning=neither torch-sys nor LIBTORCH names the libtorch directory; no rpath set"
        );
        return;
    };
    let dir = std::path::Path::new(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../lib");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    if dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
