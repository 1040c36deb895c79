//! Compiles `proto/yidi/v1/*.proto` with protox (pure Rust, no system protoc) and writes both the
//! generated code and the encoded file descriptor set (served by reflection) into OUT_DIR.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let mut files: Vec<PathBuf> = fs::read_dir(proto_root.join("yidi/v1"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    // The order of the set (and of the access table generated from it) must not depend on the
    // file system's.
    files.sort();
    println!("cargo:rerun-if-changed={}", proto_root.display());

    // What `protox::compile` does, keeping the compiler: its `encode_file_descriptor_set` keeps
    // custom options such as `(yidi.v1.policy)`, which the prost-types set (and so its
    // `encode_to_vec`) drops, prost having no room for unknown fields.
    let mut compiler = protox::Compiler::new([&proto_root])?;
    compiler.include_source_info(true).include_imports(true).open_files(&files)?;
    let descriptors = compiler.file_descriptor_set();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // tonic-prost-build ignores file_descriptor_set_path with compile_fds: encode it ourselves.
    fs::write(out_dir.join("yidi_descriptor.bin"), compiler.encode_file_descriptor_set())?;

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
