fn main() -> std::process::ExitCode {
    explora::cli::main()
}
