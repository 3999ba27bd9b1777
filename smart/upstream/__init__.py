"""One upstream attempt over requests/urllib3: the client, its transport, and the
private urllib3 names they rely on."""
