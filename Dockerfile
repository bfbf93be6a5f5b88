# One image for the controller and the runner Jobs: the agentops binary, git, and the pinned
# Claude Code CLI (a native binary; no Node.js at run time). Non-root (uid 10001), made for a
# read-only root filesystem: HOME, TMPDIR and the workspace are volumes in the pod.

FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock rustfmt.toml ./
# The crate dependencies in a layer of their own, built against empty stand-ins of our sources
# (and of the benches Cargo.toml declares): a source change does not rebuild them. Our own
# crate's build records are removed, so that the real sources below are always compiled.
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && for b in $(awk '/^\[\[bench\]\]/ { b = 1; next } b && /^name/ { gsub(/"/, "", $3); print $3; b = 0 }' Cargo.toml); do \
      echo 'fn main() {}' > "benches/$b.rs"; done \
 && cargo build --release --locked --bin agentops \
 && rm -rf src benches target/release/.fingerprint/agentops-* target/release/deps/agentops-* \
      target/release/deps/libagentops-* target/release/agentops
COPY src src
COPY migrations migrations
COPY benches benches
COPY examples examples
COPY tests tests
RUN cargo build --release --locked --bin agentops \
 && strip target/release/agentops

FROM node:22-bookworm-slim AS claude
# Same pin as package.json; the npm package carries the platform's native binary.
RUN npm install --global --no-audit --no-fund @anthropic-ai/claude-code@2.1.332 \
 && cp -L "$(npm root --global)/@anthropic-ai/claude-code/bin/claude.exe" /claude \
 && /claude --version

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --home-dir /home/agentops --create-home agentops
COPY --from=build /src/target/release/agentops /usr/local/bin/agentops
COPY --from=claude /claude /usr/local/bin/claude
USER 10001:10001
ENV HOME=/home/agentops \
    AGENTOPS_CLAUDE_BIN=/usr/local/bin/claude \
    DISABLE_AUTOUPDATER=1
ENTRYPOINT ["agentops"]
CMD ["controller"]
