# Shortcuts; the scripts are the source of truth.
.PHONY: demo demo-stop test build openapi

demo:
	bash scripts/demo.sh

demo-stop:
	bash scripts/demo.sh stop

test:
	bash scripts/test.sh

build:
	cargo build --release

openapi:
	UPDATE_OPENAPI=1 cargo test -p virt8ra-server openapi
