# The README's two commands: `make up` and `make test`.
SHELL := /bin/bash
N ?= 10
export PATH := $(HOME)/.cargo/bin:$(PATH)

RELEASE ?= bookworm

.PHONY: up test test-vm bench deps build clean assets install uninstall deb static-dropbear static-busybox

# Where `make install` puts things (Debian's places with PREFIX=/usr, as
# the .deb does).
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man/man1
BASHDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHDIR ?= $(PREFIX)/share/zsh/vendor-completions
FISHDIR ?= $(PREFIX)/share/fish/vendor_completions.d
UNITDIR ?= $(PREFIX)/lib/systemd/system
ASSETS := target/assets

## Install what is missing, build, and bring up N containers (default 10).
up: deps build
	./target/release/nifty up $(N)
	./target/release/nifty list

## Install what is missing and run the whole test suite, privileged tests
## included (they fail instead of skipping when they cannot run), then the
## same nifty on Debian 12's own kernel with systemd as PID 1, in a VM.
test:
	@./scripts/install-deps --test
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	NIFTY_REQUIRE_PRIVILEGED=1 cargo test --all-targets
	./scripts/build-static-dropbear target/dropbear-static
	./scripts/build-static-busybox target/busybox-static
	NIFTY_DROPBEAR=$(CURDIR)/target/dropbear-static/dropbear \
	  NIFTY_BUSYBOX=$(CURDIR)/target/busybox-static/busybox NIFTY_REQUIRE_PRIVILEGED=1 \
	  cargo test --test integration -- transfer:: fleet:: security:: ondemand::
	bench/fleet --count 100 --smoke
	tests/vm/run --release bookworm

## Dropbear built statically from Debian's source package, into
## target/dropbear-static (then: nifty template build --dropbear
## target/dropbear-static/dropbear, or NIFTY_DROPBEAR=... for `up`).
static-dropbear:
	./scripts/build-static-dropbear target/dropbear-static

## BusyBox built statically (musl) from Debian's source package, into
## target/busybox-static (then: nifty template build --busybox
## target/busybox-static/busybox).
static-busybox:
	./scripts/build-static-busybox target/busybox-static

## The VM tests alone, on one release (make test-vm RELEASE=trixie).
test-vm: deps
	tests/vm/run --release $(RELEASE)

## The benchmark of the README (N=1000 by hand: make bench N=1000).
bench: deps
	bench/fleet --count $(N)

deps:
	@./scripts/install-deps

build:
	cargo build --release

clean:
	cargo clean

## Man pages (one per verb), shell completions and nifty@.service for a
## nifty at $(BINDIR)/nifty, generated from the binary into target/assets.
assets: build
	rm -rf $(ASSETS) && mkdir -p $(ASSETS)/man $(ASSETS)/completions
	./target/release/nifty --quiet manpages $(ASSETS)/man
	gzip -9n $(ASSETS)/man/*.1
	./target/release/nifty completions bash > $(ASSETS)/completions/nifty
	./target/release/nifty completions zsh > $(ASSETS)/completions/_nifty
	./target/release/nifty completions fish > $(ASSETS)/completions/nifty.fish
	./target/release/nifty systemd show --nifty $(BINDIR)/nifty > $(ASSETS)/nifty@.service

## Install binary, man pages, completions and the template unit
## (make install PREFIX=/usr DESTDIR=/tmp/stage).
install: assets
	install -Dm755 target/release/nifty $(DESTDIR)$(BINDIR)/nifty
	install -d $(DESTDIR)$(MANDIR)
	install -m644 $(ASSETS)/man/*.1.gz $(DESTDIR)$(MANDIR)/
	install -Dm644 $(ASSETS)/completions/nifty $(DESTDIR)$(BASHDIR)/nifty
	install -Dm644 $(ASSETS)/completions/_nifty $(DESTDIR)$(ZSHDIR)/_nifty
	install -Dm644 $(ASSETS)/completions/nifty.fish $(DESTDIR)$(FISHDIR)/nifty.fish
	install -Dm644 $(ASSETS)/nifty@.service $(DESTDIR)$(UNITDIR)/nifty@.service

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/nifty $(DESTDIR)$(MANDIR)/nifty.1.gz $(DESTDIR)$(MANDIR)/nifty-*.1.gz \
	  $(DESTDIR)$(BASHDIR)/nifty $(DESTDIR)$(ZSHDIR)/_nifty $(DESTDIR)$(FISHDIR)/nifty.fish \
	  $(DESTDIR)$(UNITDIR)/nifty@.service

## A Debian package, target/debian/nifty_<version>_amd64.deb (cargo-deb;
## its metadata is in Cargo.toml).
deb:
	command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
	$(MAKE) assets BINDIR=/usr/bin
	cargo deb --no-build
