fn main() {
    println!("tagway {}", env!("CARGO_PKG_VERSION"));
}
