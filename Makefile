# poplock — build, test and install.
#
#   make demo     a real Dovecot login becomes a relay grant, end to end (installs what it needs)
#   make check    the whole test suite (installs what it needs)
#   make bench    the benchmarks under bench/
#   make install [DESTDIR=...] [PREFIX=/usr/local]    and    make uninstall
#   make deb      the Debian package, build/deb/poplock_VERSION_all.deb (checked by lintian)

PYTHON ?= /usr/bin/python3
VENV ?= .venv

# Debian 12 packages the product and its tests use.
APT_PACKAGES = python3-venv python3-gdbm python3-systemd systemd systemd-journal-remote \
	dovecot-core dovecot-pop3d dovecot-imapd openssl postfix mailfront ucspi-tcp qpsmtpd libnet-ip-perl \
	util-linux mandoc man-db systemd-container openbsd-inetd faketime gcc strace iproute2 gdbmtool
# What `make deb` builds the package with, and checks it with.
APT_PACKAGES += debhelper dh-python pybuild-plugin-pyproject python3-all lintian

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

# The one place the version is written, and the date of the release: its debian/changelog entry's.
VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' poplock/__init__.py)
RELEASE_DATE = $(shell LC_ALL=C date -u -d "$$(sed -n 's/^ -- .*>  //p' debian/changelog | head -n 1)" '+%B %-d, %Y')

# Units and man pages name the programs /usr/bin/NAME; installed, they name them under $(BINDIR).
PROGRAM_NAMES = $(foreach program,$(PROGRAMS),$(firstword $(subst :, ,$(program)))) relaylock
empty :=
space := $(empty) $(empty)
AT_BINDIR = s\#/usr/bin/($(subst $(space),|,$(PROGRAM_NAMES)))([^a-z-]|$$)\#$(BINDIR)/\1\2\#g
# ... and the man pages carry the release's date and version.
AS_RELEASED = s/^\.Dd .*/.Dd $(RELEASE_DATE)/; s/^\.Os .*/.Os poplock $(VERSION)/

# What the installed programs import besides the standard library: module, then its Debian package.
RUNTIME_DEPENDENCIES = systemd.journal:python3-systemd systemd.daemon:python3-systemd dbm.gnu:python3-gdbm

.PHONY: deps boot-without-test-daemons venv test-servers check demo bench install install-check install-modules install-relaylock \
	install-data uninstall deb

deps:
	@missing=""; for package in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${db:Status-Abbrev}' $$package 2>/dev/null | grep -q '^ii' || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing \
			&& $(MAKE) -s boot-without-test-daemons PACKAGES="$$missing"; \
	fi

# Daemons that only the tests run, each test starting its own under its own configuration: their
# packages' postinst enables them at boot. Those that deps installed are disabled at boot again
# (stopped too when systemd runs), whether systemd is PID 1 or not: systemctl disable edits the
# unit links either way, and update-rc.d the init scripts' rc links, which a SysV boot would follow.
# Packages the machine had before are left as they were.
TEST_ONLY_DAEMONS = qpsmtpd openbsd-inetd

boot-without-test-daemons:
	@for package in $(TEST_ONLY_DAEMONS); do \
		case " $(PACKAGES) " in *" $$package "*) ;; *) continue ;; esac; \
		now=""; [ -d /run/systemd/system ] && now="--now"; \
		for unit in $$(dpkg-query -L $$package | sed -n 's#^\(/usr\)\{0,1\}/lib/systemd/system/\([^/]*\.service\)$$#\2#p'); do \
			[ -L /lib/systemd/system/$$unit ] || systemctl disable $$now --quiet $$unit; \
		done; \
		for script in $$(dpkg-query -L $$package | sed -n 's#^/etc/init\.d/##p'); do \
			update-rc.d $$script disable >/dev/null 2>&1; \
			[ -z "$$now" ] || systemctl stop $$script.service 2>/dev/null || true; \
		done; \
		echo "$$package: disabled at boot (the tests run their own)"; \
	done

venv: deps
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# The tree on sys.path by a plain .pth line, as an installed package is found: the default editable
	@# install imports a finder (pathlib, re, urllib) at every start, 11 ms of each program's start-up here.
	@$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
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

# install: the Python modules and programs (install-modules, install-relaylock) and everything
# else (install-data); debian/rules uses the last two, pybuild installing the modules.
install: install-check install-modules install-relaylock install-data
	@if [ -z "$(DESTDIR)" ]; then \
		systemd-sysusers $(SYSUSERSDIR)/poplock.conf; \
		systemd-tmpfiles --create $(TMPFILESDIR)/poplock.conf; \
		journalctl --update-catalog || true; \
		if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
		if command -v mandb >/dev/null; then mandb -q; fi; \
	fi

# The python the programs run with must import what they need: say what is missing, and stop.
install-check:
	@missing=""; for dependency in $(RUNTIME_DEPENDENCIES); do \
		$(PYTHON) -c "import $${dependency%%:*}" 2>/dev/null || \
			case " $$missing " in *" $${dependency#*:} "*) ;; *) missing="$$missing $${dependency#*:}";; esac; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "make install: poplock's programs would run with $(PYTHON), which lacks:$$missing" >&2; \
		echo "  install them first (apt-get install$$missing), or give PYTHON= a python that has them" >&2; \
		exit 1; \
	fi

install-modules:
	install -d $(DESTDIR)$(PYTHONDIR)/poplock $(DESTDIR)$(BINDIR)
	install -m 644 $(MODULES) $(DESTDIR)$(PYTHONDIR)/poplock/
	$(PYTHON) -m compileall -q -d $(PYTHONDIR)/poplock $(DESTDIR)$(PYTHONDIR)/poplock
	@for program in $(PROGRAMS); do \
		name=$${program%%:*}; module=$${program#*:}; \
		$(call write_program,$(DESTDIR)$(BINDIR)/$$name,$(PYTHONDIR),$$module,-I); \
	done

install-relaylock:
	install -d $(DESTDIR)$(BINDIR)
	@$(call write_relaylock,$(DESTDIR)$(BINDIR)/relaylock,$(PYTHONDIR))

install-data:
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(CATALOGDIR) \
		$(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man7 $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(SYSCONFDIR)/poplock/poplock.conf.d
	for unit in $(UNITS); do \
		sed -E '$(AT_BINDIR)' $$unit > $(DESTDIR)$(UNITDIR)/$${unit#units/} && \
		chmod 644 $(DESTDIR)$(UNITDIR)/$${unit#units/} || exit 1; \
	done
	install -m 644 tmpfiles.d/poplock.conf $(DESTDIR)$(TMPFILESDIR)/poplock.conf
	install -m 644 sysusers.d/poplock.conf $(DESTDIR)$(SYSUSERSDIR)/poplock.conf
	install -m 644 catalog/poplock.catalog $(DESTDIR)$(CATALOGDIR)/poplock.catalog
	for page in $(MANPAGES); do \
		sed -E -e '$(AT_BINDIR)' -e '$(AS_RELEASED)' $$page > $(DESTDIR)$(MANDIR)/man$${page##*.}/$${page#man/} && \
		chmod 644 $(DESTDIR)$(MANDIR)/man$${page##*.}/$${page#man/} || exit 1; \
	done
	@# An administrator's configuration is never overwritten.
	@for file in poplock.conf static-allowed; do \
		test -e $(DESTDIR)$(SYSCONFDIR)/poplock/$$file || install -m 644 etc/$$file $(DESTDIR)$(SYSCONFDIR)/poplock/$$file; \
	done

# Units that would keep running from deleted files are stopped and disabled first; then no
# .wants/ or .requires/ link to a poplock unit is left, whoever made it.
ENABLED_LINKS = $(foreach unit,$(notdir $(UNITS)),$(DESTDIR)$(SYSCONFDIR)/systemd/system/*.wants/$(unit) \
	$(DESTDIR)$(SYSCONFDIR)/systemd/system/*.requires/$(unit))

uninstall:
	@if [ -n "$(DESTDIR)" ]; then :; \
	elif [ -d /run/systemd/system ] && systemctl show-environment >/dev/null 2>&1; then \
		installed=""; for unit in $(filter-out %@.service,$(notdir $(UNITS))); do \
			if [ -e $(UNITDIR)/$$unit ]; then installed="$$installed $$unit"; fi; \
		done; \
		if [ -n "$$installed" ]; then systemctl disable --now $$installed || exit 1; fi; \
		systemctl stop 'poplock-smtp@*.service' || exit 1; \
	else \
		echo "make uninstall: no running systemd to stop and disable poplock's units with: removing their files only"; \
	fi
	rm -f $(ENABLED_LINKS)
	rm -rf $(DESTDIR)$(PYTHONDIR)/poplock
	rm -f $(foreach program,$(PROGRAMS),$(DESTDIR)$(BINDIR)/$(firstword $(subst :, ,$(program)))) \
		$(DESTDIR)$(BINDIR)/relaylock
	rm -f $(foreach unit,$(UNITS),$(DESTDIR)$(UNITDIR)/$(notdir $(unit)))
	rm -f $(DESTDIR)$(TMPFILESDIR)/poplock.conf $(DESTDIR)$(SYSUSERSDIR)/poplock.conf \
		$(DESTDIR)$(CATALOGDIR)/poplock.catalog
	rm -f $(foreach page,$(MANPAGES),$(DESTDIR)$(MANDIR)/man$(subst .,,$(suffix $(page)))/$(notdir $(page)))
	@if [ -z "$(DESTDIR)" ]; then \
		journalctl --update-catalog || true; \
		if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
		if command -v mandb >/dev/null; then mandb -q; fi; \
	fi
	@echo "left in place: $(SYSCONFDIR)/poplock (your configuration) and /var/lib/poplock (the grants)"

# The package is built in a copy of the tree, since dpkg-buildpackage writes the .deb beside
# the tree it builds (and its clean step removes the *.egg-info an editable install made).
# PATH: pybuild must find Debian's python3, not another one first on PATH.
DEBBUILD ?= build/deb
LINTIAN ?= lintian
deb:
	rm -rf $(DEBBUILD) && mkdir -p $(DEBBUILD)/poplock-$(VERSION)
	tar -c --exclude-vcs --exclude=./$(VENV) --exclude=./build --exclude=./.pybuild --exclude='*.egg-info' \
		--exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache . | tar -x -C $(DEBBUILD)/poplock-$(VERSION)
	cd $(DEBBUILD)/poplock-$(VERSION) && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	$(LINTIAN) --fail-on error,warning --info $(DEBBUILD)/poplock_$(VERSION)_*.changes

check: venv test-servers
	$(VENV)/bin/python -m pytest

demo: venv
	$(VENV)/bin/python tests/demo.py

bench: venv
	$(VENV)/bin/python bench/run.py
