//! Compiles `proto/command.proto` with protox (a protobuf compiler in Rust), so building rampart
//! never needs a `protoc` binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/command.proto");
    let descriptors = protox::compile(["proto/command.proto"], ["proto"])?;
    prost_build::Config::new()
        // Deterministic encoding: the state hash is computed over encoded messages.
        .btree_map(["."])
        .message_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default, deny_unknown_fields)]")
        .enum_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .enum_attribute(".", "#[serde(rename_all = \"snake_case\")]")
        .compile_fds(descriptors)?;
    Ok(())
}
