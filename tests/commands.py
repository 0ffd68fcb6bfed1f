"""custom_scan commands for the tests: hostile ones that must be refused, legitimate ones
that must run. `{tmp}` is replaced by a directory the test watches for created files;
`{p1}`, `{p2}` by ports the test listens on; `{banner}` by a port that sends an SSH banner."""

from __future__ import annotations

READS_FILES = [
    "-iL {tmp}/targets 127.0.0.1", "-iL{tmp}/targets", "-iL -", "-i {tmp}/targets 127.0.0.1",
    "--iL={tmp}/targets", "-iL=/etc/passwd", "--excludefile /etc/passwd 127.0.0.1",
    "--excludef=/etc/passwd 127.0.0.1", "-excludefile /etc/passwd 127.0.0.1",
    "--servicedb /etc/passwd 127.0.0.1", "--ser /etc/passwd 127.0.0.1", "-servicedb=/etc/passwd 127.0.0.1",
    "--versiondb /etc/passwd 127.0.0.1", "--versiond /etc/passwd 127.0.0.1",
    "--script-args-file /etc/passwd --script default 127.0.0.1", "--script-args-f=/etc/passwd 127.0.0.1",
    "--resume {tmp}/log", "--resu {tmp}/log", "-resume {tmp}/log", "--excludefile=/etc/shadow 127.0.0.1",
]
WRITES_FILES = [
    "-oN {tmp}/a 127.0.0.1", "-oN{tmp}/a 127.0.0.1", "-oX {tmp}/a 127.0.0.1", "-oX - 127.0.0.1",
    "-oG {tmp}/a 127.0.0.1", "-oA {tmp}/a 127.0.0.1", "-oS {tmp}/a 127.0.0.1", "-oM {tmp}/a 127.0.0.1",
    "-oH {tmp}/a 127.0.0.1", "-o {tmp}/a 127.0.0.1", "-o{tmp}/a 127.0.0.1", "-m {tmp}/a 127.0.0.1",
    "-ox {tmp}/a 127.0.0.1", "-Fo{tmp}/a 127.0.0.1", "-nm{tmp}/a 127.0.0.1", "-ni{tmp}/a 127.0.0.1",
    "--oN={tmp}/a 127.0.0.1", "-oN={tmp}/a 127.0.0.1", "127.0.0.1 -oN {tmp}/a", "--append-output 127.0.0.1",
    "--app 127.0.0.1", "--stylesheet {tmp}/a 127.0.0.1", "--sty={tmp}/a 127.0.0.1", "--webxml 127.0.0.1",
    "--script-updatedb 127.0.0.1", "--script-up 127.0.0.1", "-oN {tmp}/%Y%m%d 127.0.0.1",
]
RUNS_CODE = [
    "--script {tmp}/x.nse 127.0.0.1", "--script={tmp}/x.nse 127.0.0.1", "--script ../x.nse 127.0.0.1",
    "--script {tmp} 127.0.0.1", "--script ./x 127.0.0.1", "--script x.nse 127.0.0.1",
    "--script no-such-script 127.0.0.1", "--script-help {tmp}/x.nse", "--script-help default",
    "--datadir {tmp} 127.0.0.1", "--datad {tmp} 127.0.0.1", "-datadir {tmp} 127.0.0.1",
    "--script 'default or exploit' 127.0.0.1", "--script 'not intrusive' 127.0.0.1", "--script all 127.0.0.1",
    "--script vuln 127.0.0.1", "--script exploit 127.0.0.1", "--script intrusive 127.0.0.1",
    "--script brute 127.0.0.1", "--script dos 127.0.0.1", "--script external 127.0.0.1",
    "--script broadcast 127.0.0.1", "--script malware 127.0.0.1", "--script fuzzer 127.0.0.1",
    "--script auth 127.0.0.1", "--script jdwp-info 127.0.0.1", "--script jdwp-exec 127.0.0.1",
    "--script http-fetch 127.0.0.1", "--script url-snarf 127.0.0.1", "--script mysql-audit 127.0.0.1",
    "--script targets-asn 127.0.0.1", "--script targets-xml 127.0.0.1", "--script http-* 127.0.0.1",
    "--script ssh-brute 127.0.0.1", "--script whois-ip 127.0.0.1", "--script 'default,(safe)' 127.0.0.1",
    "--script default --script-args newtargets 127.0.0.1", "--script default --script-args=newtargets=1 127.0.0.1",
    "--script default --script-args http-fetch.destination={tmp} 127.0.0.1",
    "--script default --script-args 'userdb={tmp}/u,passdb={tmp}/p' 127.0.0.1",
    "--script-args http.useragent=x 127.0.0.1", "-sC --script-args {{a=1}} 127.0.0.1", "-script {tmp}/x.nse 127.0.0.1",
    "--script default,{tmp}/x.nse 127.0.0.1",
]
RAW_OR_PRIVILEGED = [
    "-sS 127.0.0.1", "-sU 127.0.0.1", "-O 127.0.0.1", "--traceroute 127.0.0.1", "-sA 127.0.0.1",
    "-sW 127.0.0.1", "-sM 127.0.0.1", "-sN 127.0.0.1", "-sF 127.0.0.1", "-sX 127.0.0.1", "-sY 127.0.0.1",
    "-sZ 127.0.0.1", "-sO 127.0.0.1", "-sI 127.0.0.2 127.0.0.1", "--send-eth 127.0.0.1", "--send-ip 127.0.0.1",
    "--privileged 127.0.0.1", "--unprivileged 127.0.0.1", "-S 127.0.0.9 127.0.0.1", "-D RND:10 127.0.0.1",
    "--spoof-mac 0 127.0.0.1", "-e lo 127.0.0.1", "-g 53 127.0.0.1", "--source-port 53 127.0.0.1",
    "-f 127.0.0.1", "--mtu 8 127.0.0.1", "--data 0xdead 127.0.0.1", "--data-length 10 127.0.0.1",
    "--data-string x 127.0.0.1", "--ttl 1 127.0.0.1", "--badsum 127.0.0.1", "--ip-options R 127.0.0.1",
    "--scanflags SYN 127.0.0.1", "-b anonymous@127.0.0.1 127.0.0.1", "-A 127.0.0.1", "--osscan-guess 127.0.0.1",
    "-PE 127.0.0.1", "-PS22 127.0.0.1", "-sV -O 127.0.0.1",
]
UNBOUNDED = [
    "-iR 1000", "-iR0", "10.0.0.0/8", "127.0.0.0/16", "127.0-1.0-255.0-255", "127.0.0.*", "-T5 127.0.0.1",
    "-T0 127.0.0.1", "-T1 127.0.0.1", "-T insane 127.0.0.1", "--timing 5 127.0.0.1",
    "--min-rate 1000000 127.0.0.1", "--max-retries 100 127.0.0.1", "--host-timeout 0 127.0.0.1",
    "--host-timeout 0s 127.0.0.1", "--host-timeout 99h 127.0.0.1", "--max-parallelism 100000 127.0.0.1",
    "--scan-delay 1h 127.0.0.1", "--top-ports 0 127.0.0.1", "--top-ports 70000 127.0.0.1", "-p 0 127.0.0.1",
    "-p 70000 127.0.0.1", "-p 100-1 127.0.0.1", "-p 80,,81 127.0.0.1", "--version-intensity 10 -sV 127.0.0.1",
    "--min-hostgroup 100000 127.0.0.1", "--script-timeout 0s -sC 127.0.0.1", "--max-rtt-timeout 1ms 127.0.0.1",
    "--min-rate -5 127.0.0.1", "--min-rate 1e9 127.0.0.1", "--port-ratio 0.00001 127.0.0.1", "--allports -sV 127.0.0.1",
    " ".join(f"127.0.0.{i}" for i in range(1, 20)),
]
THIRD_PARTY = [
    "--proxies http://127.0.0.9:8080 127.0.0.1", "--proxy http://127.0.0.9:8080 127.0.0.1",
    "--dns-servers 8.8.8.8 127.0.0.1", "--system-dns 127.0.0.1", "-R 127.0.0.1", "--script asn-query 127.0.0.1",
    "--exclude example.com 127.0.0.1", "--route-dst 127.0.0.1",
]
SHELL_AND_ENCODING = [
    "127.0.0.1; id", "127.0.0.1;id", "127.0.0.1 && id", "127.0.0.1 | id", "$(id)", "`id`",
    "127.0.0.1 > {tmp}/a", "-p 80;id 127.0.0.1", "127.0.0.1\nid", "127.0.0.1 $HOME", "'127.0.0.1", "-p '80 127.0.0.1",
    "127.0.0.1 \\", "\u2013sV 127.0.0.1", "\u2010oN {tmp}/a 127.0.0.1", "127.0.0.1\u200b", "\uff11\uff12\uff17.0.0.1",
    "%2DoN {tmp}/a 127.0.0.1", "127.0.0.1%00", "-p 80 127.0.0.1 #", "-sV\t-oN {tmp}/a 127.0.0.1", "", "   ",
    "-sV", "-p 80", "--", "-- -oN {tmp}/a", "127.0.0.1 -- -oN {tmp}/a", "[::1]", "http://127.0.0.1/",
]
ODD_ADDRESSES = [
    "0177.0.0.1", "127.1", "2130706433", "0x7f000001", "127.000.000.001", "2852039166", "0xa9fea9fe",
    "169.254.43518", "169.254.169.254", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "metadata.google.internal",
    "100.100.100.200", "168.63.129.16", "fd00:ec2::254", "0.0.0.0", "224.0.0.1", "255.255.255.255",
    "fe80::1", "127.0.0.1/24", "64:ff9b::7f00:1", "2002:7f00:1::1",
]
CLUSTERS_AND_PREFIXES = [
    "-sVC 127.0.0.1", "-sTV 127.0.0.1", "-Pno 127.0.0.1", "-nFo{tmp}/a 127.0.0.1", "-Fv 127.0.0.1",
    "-sV6 127.0.0.1", "--top 10 127.0.0.1", "-top-ports 10 127.0.0.1", "--open=1 127.0.0.1",
    "-sV=1 127.0.0.1", "--reason=yes 127.0.0.1", "-p", "-p 80 -p 443 127.0.0.1", "-T4 -T3 127.0.0.1",
    "-v 127.0.0.1", "-vv 127.0.0.1", "-d 127.0.0.1", "-d9 127.0.0.1", "--packet-trace 127.0.0.1",
    "-h", "-V", "--iflist", "-6 ::1", "--yoloscan 127.0.0.1", "--script default --script safe 127.0.0.1",
    "--max_retries 2 127.0.0.1", "-PN 127.0.0.1", "-sP 127.0.0.1", "--stats-every 1s 127.0.0.1",
]
HOSTILE_COMMANDS = (
    READS_FILES + WRITES_FILES + RUNS_CODE + RAW_OR_PRIVILEGED + UNBOUNDED + THIRD_PARTY
    + SHELL_AND_ENCODING + ODD_ADDRESSES + CLUSTERS_AND_PREFIXES
)

# (command, ports that must be reported open): all against listeners the test opened.
LEGITIMATE_COMMANDS = [
    ("-sT -p {p1} 127.0.0.1", ["p1"]),
    ("-p {p1},{p2} 127.0.0.1", ["p1", "p2"]),
    ("-p{p1} 127.0.0.1", ["p1"]),
    ("--top-ports=100 --reason --open 127.0.0.1", ["p1"]),
    ("--top-ports 20 -T4 127.0.0.1", []),
    ("-F -T3 127.0.0.1", []),
    ("-sn 127.0.0.1-4", []),
    ("-Pn -p {p1} 127.0.0.1", ["p1"]),
    ("-p {p1} --max-retries 1 --host-timeout 30s 127.0.0.1", ["p1"]),
    ("-p {p1} --min-rate 100 --max-rate 5000 127.0.0.1", ["p1"]),
    ("-p {p1} --scan-delay 10ms --max-scan-delay 50ms 127.0.0.1", ["p1"]),
    ("-p {p1} --initial-rtt-timeout 100ms --max-rtt-timeout 500ms 127.0.0.1", ["p1"]),
    ("-p {p1} --min-parallelism 1 --max-parallelism 10 127.0.0.1", ["p1"]),
    ("-p {p1} --min-hostgroup 1 --max-hostgroup 4 127.0.0.1-4", ["p1"]),
    ("-p {p1} --exclude 127.0.0.3,127.0.0.4 127.0.0.1-4", ["p1"]),
    ("-p {p1},{p2} --exclude-ports {p2} -r 127.0.0.1", ["p1"]),
    ("-sV --version-light -p {banner} 127.0.0.1", ["banner"]),
    ("-sV --version-intensity 3 -p {banner} 127.0.0.1", ["banner"]),
    ("--script banner -p {banner} --script-timeout 10s 127.0.0.1", ["banner"]),
    ("-sC -p {p1} --script-timeout 3s 127.0.0.1", ["p1"]),
    ("--script=default,safe -p {banner} --script-timeout 3s 127.0.0.1", ["banner"]),
    ("-p {p1} -- 127.0.0.1", ["p1"]),
    ("-p {p1} localhost", ["p1"]),
    ("-T2 -p {p1} 127.0.0.1", ["p1"]),
    ("-p {p1} '127.0.0.1'", ["p1"]),
]
PRIVILEGED_COMMANDS = [
    ("-sS -p {p1} 127.0.0.1", ["p1"]),
    ("-sU -p 9 127.0.0.1", []),
    ("-O -p {p1} 127.0.0.1", ["p1"]),
    ("--traceroute -p {p1} 127.0.0.1", ["p1"]),
    ("-p {p1} 127.0.0.1", ["p1"]),
]
