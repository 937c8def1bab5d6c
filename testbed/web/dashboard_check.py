"""Drives the RhizOS web dashboard in headless Chromium (WebDriver), the way a person would.

    dashboard_check.py BASE_URL USER_CREDS OPERATOR_CREDS DEMO_WASM OUT_DIR

Checks the HTTP edges first (signed-out calls refused, a cross-site form refused, bad
credentials explained), then signs in as the user with their credentials file, deploys the demo
module from the Deploy page and watches its log lines stream and its money settle, opens every
page, creates an API key, verifies the job's receipt in the page, signs in as the operator, and
saves a screenshot of each page in OUT_DIR. Prints one JSON object of what it saw; exits
non-zero, saying why, when something is not as it should be.
"""

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

base, user_creds, operator_creds, wasm, out = sys.argv[1:6]
os.makedirs(out, exist_ok=True)
seen = {}


def http(method, path, body=None, headers=None):
    request = urllib.request.Request(base + path, method=method, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# The edges, without a browser.
status, body = http("GET", "/dashboard/api/stats")
assert status == 401 and "sign in" in body["error"], (status, body)
status, body = http("POST", "/dashboard/api/session", json.dumps({"credentials": open(user_creds).read()}).encode(),
                    {"Content-Type": "application/json"})
assert status == 403 and "X-Rhizos-Dashboard" in body["error"], ("a form from another site got in", status, body)
status, body = http("POST", "/dashboard/api/session", b'{"credentials": "{\\"v\\": 1}"}',
                    {"Content-Type": "application/json", "X-Rhizos-Dashboard": "1"})
assert status == 400 and "rhizos user add" in body["error"], (status, body)
with urllib.request.urlopen(base + "/dashboard", timeout=10) as response:
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp, csp

options = webdriver.ChromeOptions()
options.binary_location = os.environ.get("RHIZOS_CHROMIUM", "/usr/bin/chromium")
for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,900",
                 "--force-device-scale-factor=1", "--disable-gpu"]:
    options.add_argument(argument)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service(os.environ.get("RHIZOS_CHROMEDRIVER", "/usr/bin/chromedriver")),
                          options=options)
wait = WebDriverWait(driver, 30)


def text(css):
    return driver.find_element(By.CSS_SELECTOR, css).text


def until_text(css, needle):
    # As rendered (CSS may upper-case a label): compared without case.
    wait.until(lambda d: needle.lower() in d.find_element(By.CSS_SELECTOR, css).text.lower())
    return text(css)


def shot(name):
    time.sleep(0.3)  # let the last paint land
    driver.save_screenshot(os.path.join(out, name + ".png"))


def sign_in(creds, who):
    driver.get(base + "/dashboard")
    wait.until(EC.visibility_of_element_located((By.ID, "signin-form")))
    driver.find_element(By.ID, "signin-file").send_keys(os.path.abspath(creds))
    driver.find_element(By.ID, "signin-button").click()
    until_text("#who", who)
    until_text("#live-text", "live")


try:
    sign_in(user_creds, "account")
    seen["who"] = text("#who")
    until_text("main", "Nodes")
    until_text("main", "Recent jobs")

    # Deploy the demo module and watch it run and settle, without reloading.
    driver.get(base + "/dashboard#/deploy")
    wait.until(EC.presence_of_element_located((By.ID, "deploy-file")))
    driver.find_element(By.ID, "deploy-file").send_keys(os.path.abspath(wasm))
    args = driver.find_element(By.ID, "deploy-args")
    args.send_keys("count 6 250")
    cost = driver.find_element(By.ID, "deploy-max-cost")
    cost.clear()
    cost.send_keys("0.50")
    driver.find_element(By.ID, "deploy-submit").click()
    job_id = until_text("#job-id", "job-")
    until_text("#job-log", "line 1")
    lines_while_running = text("#job-log").count("line ")
    until_text("#job-log", "line 6")
    wait.until(lambda d: d.find_element(By.ID, "job-money").get_attribute("data-settled") == "true")
    seen["job_id"] = job_id
    seen["lines_first_seen"] = lines_while_running
    seen["log"] = text("#job-log")
    seen["states"] = text("#job-states")
    seen["cost"] = text("#job-cost").split()[0]
    shot("deploy")

    # Run a flow from the Flows page: one step feeding two at once (one under a condition that
    # holds), the demo module inline; watch its graph until every step has succeeded.
    module_b64 = base64.b64encode(open(wasm, "rb").read()).decode()
    def step(name, args, files=None, cap=200000):
        spec = {"workload": {"backend": "wasm", "module_b64": module_b64}, "args": args,
                "timeout_ms": 10000, "memory_mib": 64}
        if files:
            spec["input_files"] = files
        return {"name": name, "max_cost_micros": cap, "spec": spec}
    flow = {
        "name": "browser-flow", "max_cost_micros": 600000,
        "steps": [step("prep", ["upper", "in.txt", "up.txt"], {"in.txt": base64.b64encode(b"hello\nflows\n").decode()}),
                  step("left", ["upper", "a.txt", "left.txt"]),
                  step("right", ["upper", "b.txt", "right.txt"])],
        "edges": [{"from": "prep:/output/up.txt", "to": "left:/input/a.txt"},
                  {"from": "prep:/output/up.txt", "to": "right:/input/b.txt",
                   "when": {"json": "/output/up.txt.lines", "pointer": "", "op": "ge", "value": 2}}],
    }
    driver.get(base + "/dashboard#/flows")
    until_text("main h1", "Flows")
    area = wait.until(EC.presence_of_element_located((By.ID, "flow-text")))
    driver.execute_script("arguments[0].value = arguments[1];", area, json.dumps(flow))
    driver.find_element(By.ID, "flow-run").click()
    seen["flow_id"] = until_text("#flow-id", "flow-")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "main").get_attribute("data-flow-state") == "succeeded")
    seen["flow_graph"] = sorted(g.get_attribute("data-step") + ":" + g.get_attribute("data-state")
                                for g in driver.find_elements(By.CSS_SELECTOR, "#flow-graph g.flow-node"))
    seen["flow_edges"] = len(driver.find_elements(By.CSS_SELECTOR, "#flow-graph path.flow-edge"))
    seen["flow_money"] = text("#flow-money")
    shot("flow")

    driver.get(base + "/dashboard#/modules")
    until_text("main h1", "Modules")
    wait.until(lambda d: "loading" not in d.find_element(By.TAG_NAME, "main").text)
    shot("modules")

    driver.get(base + "/dashboard#/nodes")
    until_text("main", "Reputation")
    driver.find_element(By.CSS_SELECTOR, "main tr.click").click()
    until_text("main", "Plugins (asked of the node's agent now)")
    until_text("main", "loaded")
    seen["node_page"] = text("main")
    shot("node")

    driver.get(base + "/dashboard#/account")
    until_text("main", "Balance")
    driver.find_element(By.ID, "key-name").send_keys("browser")
    driver.find_element(By.ID, "key-create").click()
    seen["key"] = until_text("#key-created", "rhz_")
    until_text("main", "browser")
    seen["account_page"] = text("main")
    shot("account")

    driver.get(base + "/dashboard#/receipts/" + job_id)
    seen["receipt"] = until_text("#receipt-verdict", "signature valid")
    shot("receipts")

    driver.get(base + "/dashboard#/dashboard")
    until_text("main", "succeeded")
    shot("dashboard")

    problems = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not problems, ("the page logged errors", problems)

    # The operator sees the whole network, fees included.
    driver.find_element(By.ID, "signout").click()
    wait.until(EC.visibility_of_element_located((By.ID, "signin-form")))
    sign_in(operator_creds, "operator")
    seen["operator_dashboard"] = until_text("main", "Fees earned")
    shot("operator-dashboard")
except Exception:
    # What the page showed when it went wrong, for whoever reads the failure.
    driver.save_screenshot(os.path.join(out, "failure.png"))
    print("page at failure (" + driver.current_url + "):\n" + driver.find_element(By.TAG_NAME, "body").text,
          file=sys.stderr)
    raise
finally:
    driver.quit()

print(json.dumps(seen))
