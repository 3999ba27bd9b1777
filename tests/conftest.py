# gevent must patch the standard library before anything imports requests, urllib3
# or socket users; pytest plugins load earlier, so none of them may import requests.
from gevent import monkey

monkey.patch_all()
