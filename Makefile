# poplock — build, test and install.
#
#   make demo     a real Dovecot login becomes a relay grant, end to end (installs what it needs)
#   make check    the whole test suite (installs what it needs)
#   make bench    the benchmarks under bench/

PYTHON ?= /usr/bin/python3
VENV ?= .venv

# Debian 12 packages the product and its tests use.
APT_PACKAGES = python3-venv python3-gdbm python3-systemd systemd systemd-journal-remote \
	dovecot-core dovecot-pop3d dovecot-imapd openssl

.PHONY: deps venv check demo bench

deps:
	@missing=""; for package in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${db:Status-Abbrev}' $$package 2>/dev/null | grep -q '^ii' || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: deps
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@$(call write_relaylock,$(VENV)/bin/relaylock,$(CURDIR))

# relaylock runs once per SMTP connection: it starts Python isolated and without site
# (-IS, about 2 ms less), so the script itself says where the poplock package lives.
define write_relaylock
printf '%s\n' '#!$(PYTHON) -IS' '"""relaylock: see relaylock(8)."""' 'import sys' \
	'sys.path.insert(0, "$(2)")' 'from poplock.relaylock import main' 'sys.exit(main())' > $(1).new && \
	chmod 755 $(1).new && mv $(1).new $(1)
endef

check: venv
	$(VENV)/bin/python -m pytest

demo: venv
	$(VENV)/bin/python tests/demo.py

bench: venv
	$(VENV)/bin/python bench/run.py
