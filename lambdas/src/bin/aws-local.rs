//! `aws-local`: the AWS deployment on one machine (see `lambdas::local`).

fn main() -> std::process::ExitCode {
    lambdas::local::main()
}
