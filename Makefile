# poplock — build, test and install.
#
#   make demo     a real Dovecot login becomes a relay grant, end to end (installs what it needs)
#   make check    the whole test suite (installs what it needs)
#   make bench    the benchmarks under bench/
#   make install [DESTDIR=...] [PREFIX=/usr/local]    and    make uninstall

PYTHON ?= /usr/bin/python3
VENV ?= .venv

# Debian 12 packages the product and its tests use.
APT_PACKAGES = python3-venv python3-gdbm python3-systemd systemd systemd-journal-remote \
	dovecot-core dovecot-pop3d dovecot-imapd openssl postfix mailfront ucspi-tcp qpsmtpd libnet-ip-perl \
	util-linux mandoc man-db systemd-container openbsd-inetd faketime gcc strace iproute2

PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
BINDIR ?= $(PREFIX)/bin
PYTHONDIR ?= $(PREFIX)/lib/python3/dist-packages
UNITDIR ?= $(PREFIX)/lib/systemd/system
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
# journalctl --update-catalog reads only /usr/lib/systemd/catalog and /usr/local/lib/systemd/catalog.
CATALOGDIR ?= $(PREFIX)/lib/systemd/catalog
MANDIR ?= $(PREFIX)/share/man

PROGRAMS = poplock:poplock.cli poplock-reader:poplock.reader poplock-policy:poplock.policy \
	poplock-logauth:poplock.logauth poplock-socketmap:poplock.socketmap poplock-smtpd-filter:poplock.smtpdfilter
MODULES = $(wildcard poplock/*.py)
UNITS = $(wildcard units/*)
MANPAGES = $(wildcard man/*.[0-9])

.PHONY: deps venv test-servers check demo bench install uninstall

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
	@# Byte-compiled like an installed package, so that no program starts by compiling.
	@$(VENV)/bin/python -m compileall -q poplock

# The POP3/IMAP servers the tests run besides Dovecot (Courier, Cyrus, mailutils, popa3d,
# solid-pop3d) conflict with Dovecot's packages: they are unpacked under
# /opt/poplock-test-servers instead, with only their dependencies installed
# (tests/support/popservers.py). Quick when done already; after deps, whose apt-get it would wait for.
test-servers: deps
	@PYTHONPATH=tests $(PYTHON) -m support.popservers
	@PYTHONPATH=tests $(PYTHON) -m support.mtas

# relaylock runs once per SMTP connection: it starts Python isolated and without site
# (-IS, about 2 ms less), so the script itself says where the poplock package lives.
define write_relaylock
$(call write_program,$(1),$(2),poplock.relaylock,-IS)
endef

# write_program PATH, PACKAGE_DIR, MODULE, PYTHON_FLAGS: a script that runs MODULE's main().
define write_program
printf '%s\n' "#!$(PYTHON) $(4)" "import sys" "sys.path.insert(0, '$(2)')" \
	"from $(3) import main" "sys.exit(main())" > $(1).new && chmod 755 $(1).new && mv $(1).new $(1)
endef

install:
	install -d $(DESTDIR)$(PYTHONDIR)/poplock $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(CATALOGDIR) \
		$(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(SYSCONFDIR)/poplock/poplock.conf.d
	install -m 644 $(MODULES) $(DESTDIR)$(PYTHONDIR)/poplock/
	$(PYTHON) -m compileall -q -d $(PYTHONDIR)/poplock $(DESTDIR)$(PYTHONDIR)/poplock
	@for program in $(PROGRAMS); do \
		name=$${program%%:*}; module=$${program#*:}; \
		$(call write_program,$(DESTDIR)$(BINDIR)/$$name,$(PYTHONDIR),$$module,-I); \
	done
	@$(call write_relaylock,$(DESTDIR)$(BINDIR)/relaylock,$(PYTHONDIR))
	for unit in $(UNITS); do \
		sed -E 's#/usr/bin/(poplock|poplock-reader|poplock-policy|poplock-logauth|poplock-socketmap|relaylock)( |$$)#$(BINDIR)/\1\2#g' \
			$$unit > $(DESTDIR)$(UNITDIR)/$${unit#units/}; \
		chmod 644 $(DESTDIR)$(UNITDIR)/$${unit#units/}; \
	done
	install -m 644 tmpfiles.d/poplock.conf $(DESTDIR)$(TMPFILESDIR)/poplock.conf
	install -m 644 sysusers.d/poplock.conf $(DESTDIR)$(SYSUSERSDIR)/poplock.conf
	install -m 644 catalog/poplock.catalog $(DESTDIR)$(CATALOGDIR)/poplock.catalog
	for page in $(MANPAGES); do \
		install -m 644 $$page $(DESTDIR)$(MANDIR)/man$${page##*.}/; \
	done
	@# An administrator's configuration is never overwritten.
	@for file in poplock.conf static-allowed; do \
		test -e $(DESTDIR)$(SYSCONFDIR)/poplock/$$file || install -m 644 etc/$$file $(DESTDIR)$(SYSCONFDIR)/poplock/$$file; \
	done
	@if [ -z "$(DESTDIR)" ]; then \
		systemd-sysusers $(SYSUSERSDIR)/poplock.conf; \
		systemd-tmpfiles --create $(TMPFILESDIR)/poplock.conf; \
		journalctl --update-catalog || true; \
		if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	fi

uninstall:
	rm -rf $(DESTDIR)$(PYTHONDIR)/poplock
	rm -f $(foreach program,$(PROGRAMS),$(DESTDIR)$(BINDIR)/$(firstword $(subst :, ,$(program)))) \
		$(DESTDIR)$(BINDIR)/relaylock
	rm -f $(foreach unit,$(UNITS),$(DESTDIR)$(UNITDIR)/$(notdir $(unit)))
	rm -f $(DESTDIR)$(TMPFILESDIR)/poplock.conf $(DESTDIR)$(SYSUSERSDIR)/poplock.conf \
		$(DESTDIR)$(CATALOGDIR)/poplock.catalog
	rm -f $(foreach page,$(MANPAGES),$(DESTDIR)$(MANDIR)/man$(subst .,,$(suffix $(page)))/$(notdir $(page)))
	@echo "left in place: $(SYSCONFDIR)/poplock (your configuration) and /var/lib/poplock (the grants)"

check: venv test-servers
	$(VENV)/bin/python -m pytest

demo: venv
	$(VENV)/bin/python tests/demo.py

bench: venv
	$(VENV)/bin/python bench/run.py
