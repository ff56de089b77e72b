#!/bin/sh
# Rebuild hello.wasm (a wasi:http component) from source.
set -eu
cd "$(dirname "$0")"
cargo build --release --target wasm32-wasip2
cp target/wasm32-wasip2/release/wasm_hello.wasm hello.wasm
echo "built $(pwd)/hello.wasm"
