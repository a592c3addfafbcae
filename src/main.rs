fn main() {
    std::process::exit(memgen::cli::main());
}
